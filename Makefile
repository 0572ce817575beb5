# Cocoon: the two entry points are `make demo` and `make test` (see README).
# Everything is cached: the host packages (a stamp), cargo's target dir, the
# kernel .deb and built images (/var/lib/cocoon or ~/.cache/cocoon).

PREFIX ?= /usr/local
CARGO ?= cargo
GUEST_TARGET := x86_64-unknown-linux-gnu
# The agent is PID 1 of the guest: static glibc, since no musl target exists
# here. --target keeps these flags away from build scripts and proc macros.
AGENT := target/$(GUEST_TARGET)/guest/cocoon-agent
IMAGE_DIR := target/image
STAMP := target/.host-setup-done

.PHONY: all setup build agent image demo test test-nested lint unit integration bench soak fuzz fuzz-guided install clean critest

all: build image

setup: $(STAMP)
$(STAMP): scripts/setup-host.sh
	bash scripts/setup-host.sh
	mkdir -p target && touch $@

build: setup
	$(CARGO) build --workspace --bins

agent: setup
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
		$(CARGO) build --profile guest -p cocoon-agent --target $(GUEST_TARGET)

# The guest image: Cocoon's own kernel (built once per change of
# rootfs/kernel/, its config fragment and patches, then cached) and the agent's initramfs. KERNEL=debian
# takes Debian's cloud kernel instead.
KERNEL ?= built
image: build agent
	./target/debug/cocoon image build --agent $(AGENT) --busybox /bin/busybox --out $(IMAGE_DIR) \
		$(if $(filter built,$(KERNEL)),--built-kernel,)

# The demo: a container in a microVM through containerd (ctr run with
# io.containerd.cocoon.v2), then the same with runc; then a bare VM boot with
# its timing breakdown.
demo: image
	bash scripts/demo.sh
	@echo
	@echo "== cocoon vm boot (a bare pod VM and its agent)"
	COCOON_CONFIG=$(CURDIR)/target/demo-config.toml sh -c '\
		printf "[paths]\nimage_dir = \"$(CURDIR)/$(IMAGE_DIR)\"\n" > $$COCOON_CONFIG; \
		./target/debug/cocoon vm boot'

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# All tests: unit tests, then end-to-end tests that boot real guests, then a short
# coverage-guided run of every fuzz target (a fixed seed and count, so it is the same
# run each time for the same code). After the tests, the slowest of them and every retry
# (scripts/test-times.sh), pass or fail.
test: lint image
	@date -u +'== %T UTC: built; the tests'
	bash scripts/leftovers.sh before
	$(CARGO) nextest run --workspace --no-fail-fast; status=$$?; \
		bash scripts/test-times.sh || true; exit $$status
	bash scripts/leftovers.sh after
	@date -u +'== %T UTC: the tests passed; the fuzz run'
	FUZZ_SEED=1 bash scripts/fuzz-guided.sh $(FUZZ_CI_RUNS) $(CURDIR)/target/fuzz-guided-ci.json
	@date -u +'== %T UTC: done'
FUZZ_CI_RUNS ?= 100000

# Only the tests that need hardware KVM: where the host lacks it (PVM here)
# each reruns itself inside an L1 guest with emulated SVM (integration/nested).
# `make test` runs them too.
test-nested: image
	$(CARGO) nextest run --workspace --no-fail-fast -E 'binary(linux_boot) | test(/cocoon_vmm/)'

# Benchmarks: boot (launch -> agent ready vs raw QEMU), run (ctr run --rm
# true, cocoon vs runc, breakdown and pod memory), and cocoon-vmm start/exit
# vs QEMU microvm on a synthetic guest, and cocoon-vmm vs QEMU with KVM on
# the real guest image inside the nested harness's L1, and pods restored from a VM
# template against cold boots on cocoon-vmm, also in L1, and `ctr run` and the memory
# of idle cocoon-vmm pods in L1 (with the node build where `make install` made
# one), and cocoon-vmm's own boots where the host has hardware KVM (it says so and
# boots nothing on PVM), and bare pod VMs (QEMU) one against ten at once. JSON
# reports in target/.
bench: image
	./target/debug/cocoon image build --agent $(AGENT) --busybox /bin/busybox --out target/image-debian
	COCOON_CONFIG=$(CURDIR)/target/demo-config.toml ./target/debug/cocoon bench boot --runs 5 \
		--compare-image target/image-debian --out target/bench-boot.json
	bash scripts/bench-run.sh 10 $(CURDIR)/target/bench-run.json
	./target/debug/cocoon bench pods --runs 10 --concurrent 10 --out target/bench-pods.json
	$(CARGO) bench -p cocoon-vmm --bench boot
	bash scripts/bench-nested.sh 3 $(CURDIR)/target/bench-vmm.json
	bash scripts/bench-nested-boot.sh 3 $(CURDIR)/target/bench-nested-boot.json
	KERNEL=$(CURDIR)/target/image-debian/vmlinuz \
		bash scripts/bench-nested-boot.sh 3 $(CURDIR)/target/bench-nested-boot-debian.json
	bash scripts/bench-nested-template.sh 5 $(CURDIR)/target/bench-template.json
	bash scripts/bench-nested-run.sh 3 $(CURDIR)/target/bench-nested-run.json
	bash scripts/bench-hw-boot.sh --pack target/hw-boot
	bash scripts/bench-hw-boot.sh target/hw-boot 10 target/bench-hw-boot
	bash scripts/bench-bare-boots.sh --pack target/bare-boots
	bash scripts/bench-bare-boots.sh target/bare-boots 10 3 target/bench-bare-boots

# The long soak (issue #11): pod lifecycles through CRI with faults injected; the
# report goes to target/soak.json. `make test` runs a short one.
soak: image
	./target/debug/cocoon soak --cycles $${CYCLES:-500} --out target/soak.json

# Fuzzing on stable (issue #10): every fuzz entry point of the agent (what the host
# sends), the shim (what the guest sends) and cocoon-vmm (guest-facing devices), a
# million inputs each by default; one JSON line per target in target/fuzz-report.jsonl.
# `make fuzz-guided` is the coverage-guided run of the same entry points (libFuzzer).
fuzz: setup
	rm -f $(CURDIR)/target/fuzz-report.jsonl
	COCOON_FUZZ_ITERS=$${ITERS:-1000000} COCOON_FUZZ_REPORT=$(CURDIR)/target/fuzz-report.jsonl \
		$(CARGO) test --release -p cocoon-agent -p cocoon-shim -p cocoon-vmm -p cocoon-confidential --test fuzz_smoke
	cat $(CURDIR)/target/fuzz-report.jsonl

# Coverage-guided fuzzing (issue #10): libFuzzer through cargo-fuzz on stable, a million
# inputs per target by default (RUNS=...), corpus kept in target/fuzz-corpus/; JSON
# report in target/fuzz-guided.json, a table on stdout; a crash fails it.
fuzz-guided: setup
	bash scripts/fuzz-guided.sh $${RUNS:-1000000} $(CURDIR)/target/fuzz-guided.json

install: image
	$(CARGO) build --profile node -p cocoon-shim -p cocoon-vmm
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/cocoon
	install -m 0755 target/node/cocoon target/node/cocoon-vmm target/node/containerd-shim-cocoon-v2 \
		$(DESTDIR)$(PREFIX)/bin/
	install -m 0644 $(IMAGE_DIR)/vmlinuz $(IMAGE_DIR)/initramfs.cpio $(IMAGE_DIR)/manifest.json \
		$(DESTDIR)$(PREFIX)/share/cocoon/
	if [ -f $(IMAGE_DIR)/vmlinux ]; then install -m 0644 $(IMAGE_DIR)/vmlinux $(DESTDIR)$(PREFIX)/share/cocoon/; \
		else rm -f $(DESTDIR)$(PREFIX)/share/cocoon/vmlinux; fi

clean:
	$(CARGO) clean

# Kubernetes' CRI validation suite under runc and Cocoon, compared case by case (not in
# `make test`: critest comes from GitHub). CRITEST=path/to/critest or CRI_TOOLS=checkout;
# CONTAINERD_DIR=<dir with containerd, ctr> runs that containerd (containerd 2:
# /var/lib/cocoon/containerd2/usr/bin, which setup-host.sh unpacks); RUNC_TYPE=1 declares
# the cocoon handler runc-type, as containerd 2.1-2.3 need for user namespaces.
critest: build image
	bash scripts/critest.sh $(if $(CONTAINERD_DIR),--containerd $(CONTAINERD_DIR),) \
		$(if $(RUNC_TYPE),--runc-type,) \
		$(if $(CRITEST),--critest $(CRITEST),--cri-tools $(CRI_TOOLS))
