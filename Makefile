# One-command set-up: `make test` and `make demo` create .venv and install what they need,
# the Debian packages too (via sudo when not root).
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.pingjia-installed
APT_PKGS := mosquitto mosquitto-clients fonts-wqy-microhei socat chromium
DURATION ?= 0
PYTEST_ARGS ?=

.PHONY: test demo bench sysdeps venv clean

test: venv sysdeps
	$(VENV)/bin/pytest -n 2 --dist loadgroup -q --durations=15 --reruns 1 $(PYTEST_ARGS)

demo: venv sysdeps
	$(VENV)/bin/pingjia sim demo --duration $(DURATION)

bench: venv sysdeps
	$(VENV)/bin/pingjia bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Installs only what is missing, so a prepared machine does no apt work at all.
sysdeps:
	@missing=""; \
	for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

clean:
	rm -rf $(VENV) var build *.egg-info
