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
	python3 python3-pytest python3-requests
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

.PHONY: all deps run start stop test check unit integration asan clean

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
