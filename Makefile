# chatfcgi: see README.md. `make run` and `make test` work on a fresh
# Debian 12 with nothing but make: both install what is missing first.

PREFIX ?= /usr/local
PYTHON := /usr/bin/python3
PKGS := fcgi hiredis libcurl yajl libcrypto

# Debian packages for building, testing and running the local stack.
DEB_PACKAGES := build-essential pkg-config libfcgi-dev libfcgi-bin \
	libhiredis-dev libcurl4-openssl-dev libyajl-dev libssl-dev \
	libcmocka-dev \
	ca-certificates curl procps nginx redis-server redis-tools \
	python3 python3-pytest python3-requests clang libclang-rt-14-dev
# Installed only when the command is missing, whoever provides it: a
# NodeSource nodejs brings its own npm, which Debian's npm would conflict
# with. Node runs the OpenAI SDK test.
DEB_COMMANDS := node:nodejs npm:npm
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

VARIANT ?= release
ifeq ($(VARIANT),asan)
OPTFLAGS := -O1 -fsanitize=address,undefined -fno-sanitize-recover=all \
	-fno-omit-frame-pointer
BIN := bin/chatfcgi-asan
else
OPTFLAGS := -O2 -fstack-protector-strong -D_FORTIFY_SOURCE=2
BIN := bin/chatfcgi
endif

OBJDIR := build/$(VARIANT)
# Messages are cut to fixed-size buffers on purpose: no truncation warning.
WARNINGS := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
	-Wmissing-prototypes -Wformat=2 -Wno-format-truncation -fno-common
# Recursive (=) so that pkg-config runs only once `deps` has installed it.
CFLAGS = -std=gnu11 -D_GNU_SOURCE -g $(OPTFLAGS) $(WARNINGS) -Iinclude -MMD -MP \
	$(shell pkg-config --cflags $(PKGS))
LDLIBS = $(shell pkg-config --libs $(PKGS))
LDFLAGS = $(filter -fsanitize=%,$(OPTFLAGS))

SRCS := $(wildcard app/*.c)
OBJS := $(SRCS:app/%.c=$(OBJDIR)/app/%.o)
LIB_OBJS := $(filter-out $(OBJDIR)/app/main.o,$(OBJS))
UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(OBJDIR)/tests/%)

.PHONY: all deps run start stop test check unit integration asan clean fuzz

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

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null \
			| grep -qx installed || missing="$$missing $$p"; \
	done; \
	for cp in $(DEB_COMMANDS); do \
		command -v $${cp%%:*} >/dev/null || missing="$$missing $${cp#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "deps: installing$$missing"; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi

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

check: all unit integration

unit: $(UNIT_BINS)
	@for t in $(UNIT_BINS); do echo "== $$t"; $$t || exit 1; done

integration: $(BIN)
	CHATFCGI_BIN=$(BIN) $(PYTHON) -m pytest -q -p no:cacheprovider \
		tests/integration

# The same tests with AddressSanitizer and UBSan in the binary.
asan: deps
	@$(MAKE) --no-print-directory VARIANT=asan check

clean:
	rm -rf build bin

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
FUZZ_TARGETS := request answer sse conf route
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
