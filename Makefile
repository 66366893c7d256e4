# The two commands of the README, and the slower suites beside them.
.PHONY: demo demo-vm test test-nspawn test-kernel test-slow bench bench-nspawn man

# Where `make man` writes the manual pages (scdoc sources in man/).
BUILD ?= build
MAN_PAGES = $(BUILD)/man/liveupdated.8 $(BUILD)/man/liveupdated-qemu.8 $(BUILD)/man/liveupdatectl.1 $(BUILD)/man/org.liveupdate1.5

demo:
	@scripts/setup.sh
	.venv/bin/liveupdatectl demo

# A QEMU guest that counts in RAM, carried across a simulated kexec by the QEMU adapter.
# Its QEMU comes from a Debian sid root (bookworm's QEMU 7.2 cannot do cpr-reboot), built
# once and cached (guest/sid-root.sh). Needs root.
demo-vm:
	@scripts/setup.sh
	@scripts/nspawn-deps.sh
	@command -v as >/dev/null || apt-get install -y -q binutils
	.venv/bin/python devtools/vm_demo.py --root "$$(guest/sid-root.sh)"

test:
	@scripts/setup.sh
	.venv/bin/ruff check liveupdated tests bench devtools
	.venv/bin/mypy
	.venv/bin/python -m pytest -q

test-nspawn:
	@scripts/setup.sh
	@scripts/nspawn-deps.sh
	.venv/bin/python -m pytest -q -m nspawn tests/nspawn

test-kernel:
	@scripts/setup.sh
	@scripts/kernel/deps.sh
	.venv/bin/python -m pytest -q -m kernel tests/kernel

test-slow:
	@scripts/setup.sh
	.venv/bin/python -m pytest -q -m slow

bench:
	@scripts/setup.sh
	.venv/bin/python bench/run.py

# The blackout on the fdstore backend across a real soft-reboot, in a Debian sid container
# (systemd 262): tests/nspawn/bench_fdstore.py. Needs root; 10-20 minutes.
bench-nspawn:
	@scripts/setup.sh
	@scripts/nspawn-deps.sh
	.venv/bin/python tests/nspawn/bench_fdstore.py

# scdoc is installed when it is missing (Debian: apt-get install scdoc; needs root).
man:
	@command -v scdoc >/dev/null || apt-get install -y -q scdoc >/dev/null || \
		{ echo "make man: needs scdoc: apt-get install scdoc" >&2; exit 1; }
	@$(MAKE) -s $(MAN_PAGES)

$(BUILD)/man/%: man/%.scd
	@mkdir -p $(BUILD)/man
	scdoc < $< > $@.tmp && mv $@.tmp $@
