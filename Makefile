# chatfcgi: see README.md. `make run` and `make test` work on a fresh
# Debian 12 with nothing but make: both install what is missing first.

PREFIX ?= /usr/local
PYTHON := /usr/bin/python3
PKGS := fcgi hiredis libcurl yajl libssl libcrypto

# Debian packages for building; `make deb` needs these and debhelper only.
BUILD_PACKAGES := build-essential pkg-config libfcgi-dev libhiredis-dev \
	libcurl4-openssl-dev libyajl-dev libssl-dev
DEB_BUILD_PACKAGES := $(BUILD_PACKAGES) debhelper dpkg-dev
# ... and for testing and running the local stack.
DEB_PACKAGES := $(DEB_BUILD_PACKAGES) libfcgi-bin libcmocka-dev lintian \
	ca-certificates curl procps nginx redis-server redis-tools \
	python3 python3-pytest python3-requests clang libclang-rt-14-dev \
	chromium groff-base man-db apache2 libapache2-mod-fcgid lighttpd \
	spawn-fcgi systemd logrotate strace iproute2 openssl
# Installed only when the command is missing, whoever provides it: a
# NodeSource nodejs brings its own npm, which Debian's npm would conflict
# with. Node runs the OpenAI SDK test and the browser test.
DEB_COMMANDS := node:nodejs npm:npm
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

VARIANT ?= release
ifeq ($(VARIANT),asan)
SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=all
OPTFLAGS := -O1 $(SANITIZE) -fno-omit-frame-pointer
LINKFLAGS := $(SANITIZE)
BIN := bin/chatfcgi-asan
else
OPTFLAGS := -O2 -fstack-protector-strong -D_FORTIFY_SOURCE=2
LINKFLAGS := -Wl,-z,relro,-z,now
BIN := bin/chatfcgi
endif

OBJDIR := build/$(VARIANT)
# Messages are cut to fixed-size buffers on purpose: no truncation warning.
WARNINGS := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
	-Wmissing-prototypes -Wformat=2 -Wno-format-truncation -fno-common
# Recursive (=) so that pkg-config runs only once `deps` has installed it.
# A builder's CPPFLAGS and LDFLAGS (Debian's dpkg-buildflags) are added.
CFLAGS = -std=gnu11 -D_GNU_SOURCE -g $(OPTFLAGS) $(WARNINGS) -Iinclude -MMD -MP \
	$(CPPFLAGS) $(shell pkg-config --cflags $(PKGS))
LDLIBS = $(shell pkg-config --libs $(PKGS))
LDFLAGS += $(LINKFLAGS)

SRCS := $(wildcard app/*.c)
OBJS := $(SRCS:app/%.c=$(OBJDIR)/app/%.o)
LIB_OBJS := $(filter-out $(OBJDIR)/app/main.o,$(OBJS))
UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(OBJDIR)/tests/%)

.PHONY: all deps deb-deps run start stop test check unit layout integration \
	asan clean fuzz install uninstall FORCE bench bench-held deb test-deb \
	test-fleet

all: $(BIN)

$(BIN): $(OBJS)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(OBJDIR)/app/%.o: app/%.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c -o $@ $<

$(OBJDIR)/tests/test_%: tests/unit/test_%.c $(LIB_OBJS)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIB_OBJS) $(LDLIBS) -lcmocka

# $(call apt_install,PACKAGES,COMMANDS): installs the packages that are
# not installed, and for each COMMAND:PACKAGE whose command is missing, the
# package.
define apt_install
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null \
			| grep -qx installed || missing="$$missing $$p"; \
	done; \
	for cp in $(2); do \
		command -v $${cp%%:*} >/dev/null || missing="$$missing $${cp#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "deps: installing$$missing"; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi
endef

deps:
	$(call apt_install,$(DEB_PACKAGES),$(DEB_COMMANDS))

deb-deps:
	$(call apt_install,$(DEB_BUILD_PACKAGES))

# The local stack in the foreground; Ctrl-C stops everything it started.
run: deps
	@$(MAKE) --no-print-directory all
	@exec $(PYTHON) deploy/local/stack.py run

start: deps
	@$(MAKE) --no-print-directory all
	@$(PYTHON) deploy/local/stack.py start

stop:
	@$(PYTHON) deploy/local/stack.py stop

test: deps
	@$(MAKE) --no-print-directory check

# make test's share of fuzzing: a short run of every target.
CHECK_FUZZ_SECONDS ?= 10

check: all unit layout integration
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(CHECK_FUZZ_SECONDS)

unit: $(UNIT_BINS)
	@for t in $(UNIT_BINS); do echo "== $$t"; $$t || exit 1; done

# The module layout of doc/DESIGN.md: one way down, no include circles.
layout:
	@$(PYTHON) tests/layout.py

integration: $(BIN)
	CHATFCGI_BIN=$(BIN) $(PYTHON) -m pytest -q -p no:cacheprovider \
		tests/integration

# The fleet alone (also part of integration, about 30 s): three app hosts,
# a front nginx and a Redis Cluster in network namespaces (needs root),
# one host and one Redis master killed under load.
test-fleet: $(BIN)
	CHATFCGI_BIN=$(BIN) $(PYTHON) -m pytest -q -p no:cacheprovider -s \
		tests/integration/test_fleet.py

# The same tests with AddressSanitizer and UBSan in the binary.
asan: deps
	@$(MAKE) --no-print-directory VARIANT=asan check

clean:
	rm -rf build bin

# chatfcgi beside the shared harness's peers and ceilings (../shared/bench),
# or alone when it is absent: the CPU of a turn by process group, the
# table with histories at the trim limit and with fresh sessions, streaming
# and memory figures, also appended to tests/bench/results.md. See
# tests/bench/README.md. Takes about 12 minutes; never part of `make test`.
bench: deps
	@$(MAKE) --no-print-directory all
	@$(PYTHON) tests/bench/bench.py

# Many slow streamed answers held open at once (N = 1,000 and 4,000 by
# default; HELD_N, HELD_TARGETS, HELD_UPSTREAMS for a quick run): chatfcgi
# beside the peers, over plain HTTP and TLS, appended to
# tests/bench/results.md. See tests/bench/README.md. Takes about 7 minutes;
# never part of `make test`.
bench-held: deps
	@$(MAKE) --no-print-directory all
	@$(PYTHON) tests/bench/held.py

# Installation: `make install PREFIX=/usr DESTDIR=/tmp/pkg` (PREFIX defaults
# to /usr/local). The configuration lives in SYSCONFDIR: /etc for
# PREFIX=/usr, $(PREFIX)/etc otherwise.
ifeq ($(PREFIX),/usr)
SYSCONFDIR := /etc
else
SYSCONFDIR := $(PREFIX)/etc
endif
SBINDIR := $(PREFIX)/sbin
MANDIR := $(PREFIX)/share/man
UNITDIR := $(PREFIX)/lib/systemd/system
WWWDIR := $(PREFIX)/share/chatfcgi/www
DOCDIR := $(PREFIX)/share/doc/chatfcgi
CONF_DIR := $(SYSCONFDIR)/chatfcgi
CONF_PATH := $(CONF_DIR)/chatfcgi.conf
INSTALL := install
UNIT_NAMES := chatfcgi.service chatfcgi.socket chatfcgi-status.socket
DOCS := README.md LICENSE

# Every build compiles in the configuration path that `install` uses for
# the same PREFIX. The stamp changes only when the path does, so main.o is
# rebuilt exactly then and `make install` never installs a stale default.
CONF_STAMP := $(OBJDIR)/conf-path.stamp
$(OBJDIR)/app/main.o: $(CONF_STAMP)
$(OBJDIR)/app/main.o: CFLAGS += -DCHATFCGI_CONF_PATH='"$(CONF_PATH)"'

$(CONF_STAMP): FORCE
	@mkdir -p $(@D)
	@echo '$(CONF_PATH)' | cmp -s - $@ || echo '$(CONF_PATH)' > $@

FORCE:

# The config is never overwritten: a different one already there is kept
# and the new default goes beside it as chatfcgi.conf.dist. The systemd
# units (deploy/systemd/) and the web page (app/www/) are installed when
# present; the units are written for PREFIX=/usr, so their /usr/sbin and
# /etc paths are rewritten for other prefixes.
install: all
	$(INSTALL) -d -m 0755 '$(DESTDIR)$(SBINDIR)' '$(DESTDIR)$(CONF_DIR)' \
		'$(DESTDIR)$(MANDIR)/man8' '$(DESTDIR)$(DOCDIR)'
	$(INSTALL) -m 0755 $(BIN) '$(DESTDIR)$(SBINDIR)/chatfcgi'
	@conf='$(DESTDIR)$(CONF_PATH)'; \
	if [ ! -e "$$conf" ] && [ ! -L "$$conf" ]; then \
		echo "$(INSTALL) -m 0640 conf/chatfcgi.conf $$conf"; \
		$(INSTALL) -m 0640 conf/chatfcgi.conf "$$conf"; \
	elif cmp -s conf/chatfcgi.conf "$$conf"; then \
		echo "install: $$conf is the default already"; \
	else \
		echo "install: keeping $$conf; the new default is $$conf.dist"; \
		$(INSTALL) -m 0640 conf/chatfcgi.conf "$$conf.dist"; \
	fi
	$(INSTALL) -m 0644 doc/chatfcgi.8 '$(DESTDIR)$(MANDIR)/man8/chatfcgi.8'
	$(INSTALL) -m 0644 $(DOCS) '$(DESTDIR)$(DOCDIR)/'
	@for u in $(UNIT_NAMES); do \
		[ -f "deploy/systemd/$$u" ] || continue; \
		dest='$(DESTDIR)$(UNITDIR)'/$$u; \
		echo "$(INSTALL) -m 0644 deploy/systemd/$$u $$dest"; \
		$(INSTALL) -D -m 0644 "deploy/systemd/$$u" "$$dest" && \
		sed -i -e 's#\(^\|[=[:space:]"@-]\)/usr/sbin/chatfcgi\>#\1$(SBINDIR)/chatfcgi#g' \
			-e 's#\(^\|[=[:space:]"@-]\)/etc/chatfcgi\>#\1$(CONF_DIR)#g' \
			"$$dest" || exit 1; \
	done
	@if [ -d app/www ]; then \
		cd app/www && find . -name '.?*' -prune -o -type f -print | \
		sort | while IFS= read -r f; do \
			dest='$(DESTDIR)$(WWWDIR)'/"$${f#./}"; \
			echo "$(INSTALL) -m 0644 app/www/$${f#./} $$dest"; \
			$(INSTALL) -D -m 0644 "$$f" "$$dest" || exit 1; \
		done; \
	fi

# The Debian package, built by debhelper from a copy of the sources with
# deploy/debian/ as its debian/ directory: build/deb/chatfcgi_*.deb. See
# deploy/README.md, section "Debian package".
DEB_DIR := build/deb
DEB_SOURCES := Makefile README.md LICENSE app include conf doc deploy

deb: deb-deps
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	cp -a $(DEB_SOURCES) $(DEB_DIR)/src/
	cp -a deploy/debian $(DEB_DIR)/src/debian
	cd $(DEB_DIR)/src && dpkg-buildpackage -b -us -uc
	@ls $(DEB_DIR)/*.deb

# The package installed for real, as root with the Debian mirror; takes
# about 3 minutes, not part of `make test`. First on a brand-new Debian 12:
# FRESH_DEBIAN makes a debootstrap chroot from a clone of this checkout's
# last commit and runs tests/deb/fresh-install.sh there. Then under a real
# systemd: tests/deb/boot-units.sh boots a Debian tree with the package in
# systemd-nspawn (package systemd-container) and checks the units' sandbox.
FRESH_DEBIAN ?= ../shared/tools/fresh-debian.sh

test-deb: deb
	$(FRESH_DEBIAN) . tests/deb/fresh-install.sh
	$(call apt_install,systemd-container debootstrap)
	tests/deb/boot-units.sh

# Removes what install installed, but keeps a config that was changed.
uninstall:
	rm -f '$(DESTDIR)$(SBINDIR)/chatfcgi' \
		'$(DESTDIR)$(MANDIR)/man8/chatfcgi.8' \
		$(addprefix '$(DESTDIR)$(DOCDIR)'/,$(DOCS)) \
		$(addprefix '$(DESTDIR)$(UNITDIR)'/,$(UNIT_NAMES)) \
		'$(DESTDIR)$(CONF_PATH).dist'
	@conf='$(DESTDIR)$(CONF_PATH)'; \
	if cmp -s conf/chatfcgi.conf "$$conf"; then \
		echo "rm -f $$conf"; rm -f "$$conf"; \
	elif [ -e "$$conf" ]; then \
		echo "uninstall: keeping the changed $$conf"; \
	fi
	@if [ -d app/www ] && [ -d '$(DESTDIR)$(WWWDIR)' ]; then \
		cd app/www && find . -name '.?*' -prune -o -type f -print | \
		while IFS= read -r f; do \
			rm -f '$(DESTDIR)$(WWWDIR)'/"$${f#./}"; \
		done; \
		find '$(DESTDIR)$(WWWDIR)' -depth -type d -empty -delete; \
	fi
	@rmdir '$(DESTDIR)$(PREFIX)/share/chatfcgi' '$(DESTDIR)$(DOCDIR)' \
		'$(DESTDIR)$(CONF_DIR)' 2>/dev/null || true

-include $(OBJS:.o=.d) $(UNIT_BINS:=.d)

# Fuzzing with libFuzzer (clang), see tests/fuzz/README.md. `make fuzz` runs
# each target for FUZZ_SECONDS on a scratch copy of its seed corpus (new
# inputs stay in build/fuzz/run/, never in tests/fuzz/corpus) and fails if
# any target crashes, naming the input that did it.
FUZZ_CC := clang
FUZZ_SECONDS ?= 60
FUZZ_MAX_LEN ?= 65536
# A slow input is a finding too (a quadratic parser is a DoS).
FUZZ_TIMEOUT ?= 10
FUZZ_TARGETS := request answer sse conf route item
FUZZ_DIR := build/fuzz
# Not CFLAGS: those carry gcc-only switches and _FORTIFY_SOURCE.
FUZZ_CFLAGS = -std=gnu11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer \
	-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all \
	-Wall -Wextra -Iinclude -MMD -MP $(shell pkg-config --cflags $(PKGS))
FUZZ_LDFLAGS := -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_BINS := $(FUZZ_TARGETS:%=$(FUZZ_DIR)/fuzz_%)
# The first line of a report in a libFuzzer log (a sed regex): a sanitizer
# error, a crash, leak, timeout or out-of-memory, or a UBSan runtime error.
FUZZ_REPORT := ^==[0-9]*== *ERROR\|runtime error\|^ALARM
# Every target links all app objects: a list per target would break each
# time a module gains a dependency.
FUZZ_ALL_OBJS := $(LIB_OBJS:$(OBJDIR)/%=$(FUZZ_DIR)/%)

$(FUZZ_DIR)/app/%.o: app/%.c
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c -o $@ $<

$(FUZZ_DIR)/tests/fuzz_%.o: tests/fuzz/fuzz_%.c
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c -o $@ $<

# Keep the objects make would otherwise delete as intermediates.
.SECONDARY: $(FUZZ_ALL_OBJS) $(FUZZ_TARGETS:%=$(FUZZ_DIR)/tests/fuzz_%.o)
$(FUZZ_DIR)/fuzz_%: $(FUZZ_DIR)/tests/fuzz_%.o $(FUZZ_ALL_OBJS)
	$(FUZZ_CC) $(FUZZ_LDFLAGS) -o $@ $^ $(LDLIBS)

fuzz: deps
	@$(MAKE) --no-print-directory $(FUZZ_BINS)
	@failed=""; for t in $(FUZZ_TARGETS); do \
		run=$(FUZZ_DIR)/run/$$t; \
		rm -rf $$run && mkdir -p $$run/corpus $$run/artifacts || exit 1; \
		cp tests/fuzz/corpus/$$t/* $$run/corpus/ || exit 1; \
		echo "== fuzz_$$t: $(FUZZ_SECONDS) s, log in $$run/log"; \
		if $(FUZZ_DIR)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) \
			-max_len=$(FUZZ_MAX_LEN) -timeout=$(FUZZ_TIMEOUT) \
			-print_final_stats=1 -artifact_prefix=$$run/artifacts/ \
			$$run/corpus >$$run/log 2>&1; then \
			grep -E '^#[0-9]+[[:space:]]+DONE' $$run/log | tail -n 1; \
			grep -E '^stat::(number_of_executed_units|average_exec_per_sec):' \
				$$run/log; \
		else \
			failed="$$failed $$t"; \
			sed -n '/$(FUZZ_REPORT)/,/^Base64:/p' $$run/log | head -n 80; \
			grep -E '^#[0-9]+[[:space:]]' $$run/log | tail -n 1; \
			grep -E '^stat::number_of_executed_units:' $$run/log; \
			for f in $$run/artifacts/*; do \
				[ -e "$$f" ] && echo "fuzz_$$t: CRASH input $$f"; \
			done; \
		fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: FAILED:$$failed"; exit 1; fi; \
	echo "fuzz: no crash in $(FUZZ_SECONDS) s per target"

-include $(FUZZ_ALL_OBJS:.o=.d) $(FUZZ_TARGETS:%=$(FUZZ_DIR)/tests/fuzz_%.d)
