#!/usr/bin/env bash
# Host agent vs libvirt/virtnbdbackup on the same tiny guest (docs/bench/hypervisor.md).
#
#   sudo bench/hypervisor.sh            (root: libvirtd, qemu:///system)
#
# Environment: RUNS (Cairn snapshots, default 10), VNB_RUNS (virtnbdbackup fulls, default 5),
# WORK (scratch dir, default a new /tmp/cairn-hvbench.XXXX), CAIRN_TEST_GUEST_DIR (the guest of
# scripts/build-test-guest.sh, default <repo>/target/test-guest), CARGO_TARGET_DIR.
#
# 1. A 256 MiB ext4 disk holding a 192 MiB random file (so holes do not flatter either reader),
#    as qcow2; one copy per side.
# 2. Cairn: examples/freeze_bench.rs boots the guest through QemuDriver (-accel tcg), then RUNS
#    times: fleecing snapshot with guest freeze, read the export with cairn-nbd, then with
#    `nbdcopy URI null:`, delete. Medians as JSON -> WORK/cairn.json.
# 3. libvirt: starts virtlogd and libvirtd by hand (pid files in WORK; stopped by those PIDs at the
#    end), a transient <domain type='qemu'> (TCG) with the same kernel, initrd and disk copy and a
#    qemu-ga channel, then VNB_RUNS times `virtnbdbackup -l full` into a new directory. The freeze
#    window is read from libvirtd's debug log (virt-admin, one file per run): from
#    `Send command '{"execute":"guest-fsfreeze-freeze"}'` to the reply of guest-fsfreeze-thaw,
#    the same span Cairn's quiesce_window_ms covers (freeze sent .. thaw answered).
# Packages it installs when missing: libnbd-bin, libvirt (bookworm-backports), virtnbdbackup.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-10}
VNB_RUNS=${VNB_RUNS:-5}
GUEST=${CAIRN_TEST_GUEST_DIR:-$REPO_ROOT/target/test-guest}
WORK=${WORK:-$(mktemp -d /tmp/cairn-hvbench.XXXX)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
DOMAIN=cairn-hvbench
URI=qemu:///system
APT=(apt-get -q -y -o DPkg::Lock::Timeout=600)

log() { printf 'hypervisor.sh: %s\n' "$*" >&2; }
[[ $(id -u) == 0 ]] || { log "run as root"; exit 1; }
mkdir -p "$WORK"
cd "$WORK"

# --- dependencies -------------------------------------------------------------------------
command -v nbdcopy >/dev/null || "${APT[@]}" install --no-install-recommends libnbd-bin
if ! command -v libvirtd >/dev/null || ! command -v virtnbdbackup >/dev/null; then
    # Backports source: scripts/install-deps.sh. Backports keeps qemu at 10.x.
    "${APT[@]}" install -t bookworm-backports --no-install-recommends \
        libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu virtnbdbackup
fi
qemu-img --version | head -1 | grep -q 'version 10\.' || { log "qemu-img is not 10.x"; exit 1; }
bash "$REPO_ROOT/scripts/build-test-guest.sh" "$GUEST"

# --- the disk -----------------------------------------------------------------------------
mkdir -p src
head -c 192M /dev/urandom >src/random.bin
echo "hello from the host" >src/hello.txt
mke2fs -q -F -t ext4 -d src disk.img 256M
qemu-img convert -O qcow2 disk.img base.qcow2
rm -f disk.img src/random.bin
cp base.qcow2 cairn.qcow2
cp base.qcow2 libvirt.qcow2

{ echo "== uptime before"; uptime; nproc; } | tee machine.txt

# --- Cairn --------------------------------------------------------------------------------
(cd "$REPO_ROOT" && cargo build -q --release -p cairn-hypervisor --example freeze_bench)
"$CARGO_TARGET_DIR/release/examples/freeze_bench" --guest "$GUEST" --disk "$WORK/cairn.qcow2" \
    --state "$WORK/state" --runs "$RUNS" >cairn.json 2>cairn.log
{ echo "== uptime after Cairn"; uptime; } | tee -a machine.txt

# --- libvirt / virtnbdbackup ----------------------------------------------------------------
started=()
stop_daemons() {
    virsh -c "$URI" destroy "$DOMAIN" >/dev/null 2>&1 || true
    local p
    for p in "${started[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${started[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    done
}
trap stop_daemons EXIT
if ! pgrep -x virtlogd >/dev/null; then
    virtlogd -d -p "$WORK/virtlogd.pid"
    sleep 0.5
    started+=("$(cat "$WORK/virtlogd.pid")")
fi
if ! pgrep -x libvirtd >/dev/null; then
    libvirtd -d -p "$WORK/libvirtd.pid"
    sleep 0.5
    started+=("$(cat "$WORK/libvirtd.pid")")
fi
log "daemons started by this script: ${started[*]:-none}"
for _ in $(seq 60); do virsh -c "$URI" version >/dev/null 2>&1 && break; sleep 1; done

cat >dom.xml <<EOF
<domain type='qemu'>
  <name>$DOMAIN</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$GUEST/vmlinux</kernel>
    <initrd>$GUEST/initrd.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable no_timer_check lpj=4200000 8250.nr_uarts=1</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$WORK/libvirt.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='$WORK/libvirt-serial.log'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
virsh -c "$URI" create dom.xml
qpid=$(pgrep -f "guest=$DOMAIN" | head -1)
tr '\0' ' ' </proc/"$qpid"/cmdline | grep -q -- '-accel tcg' || { log "QEMU not on TCG"; exit 1; }
for _ in $(seq 120); do
    virsh -c "$URI" qemu-agent-command "$DOMAIN" '{"execute":"guest-ping"}' >/dev/null 2>&1 && break
    sleep 1
done
virsh -c "$URI" domfsinfo "$DOMAIN"

virt-admin -c libvirtd:///system daemon-log-filters \
    "1:qemu.qemu_agent 1:qemu.qemu_monitor 1:qemu.qemu_backup 4:*"
for i in $(seq 1 "$VNB_RUNS"); do
    virt-admin -c libvirtd:///system daemon-log-outputs "1:file:$WORK/libvirtd-run$i.log"
    t0=$(date +%s.%N)
    virtnbdbackup -U "$URI" -d "$DOMAIN" -l full -o "$WORK/vnb-full$i" -n -v >"$WORK/vnb-full$i.log" 2>&1
    t1=$(date +%s.%N)
    echo "$i $t0 $t1" >>vnb-times.txt
done
virt-admin -c libvirtd:///system daemon-log-outputs "3:stderr"
{ echo "== uptime after libvirt"; uptime; } | tee -a machine.txt

python3 - "$WORK" "$VNB_RUNS" >vnb.json <<'EOF'
import json, os, re, statistics, sys
from datetime import datetime
work, n = sys.argv[1], int(sys.argv[2])
ts = lambda line: datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
times = {int(a): (float(b), float(c)) for a, b, c in (l.split() for l in open(f"{work}/vnb-times.txt"))}
rows = []
for i in range(1, n + 1):
    lines = open(f"{work}/libvirtd-run{i}.log").read().splitlines()
    freeze = next(k for k, l in enumerate(lines) if "Send command '{\"execute\":\"guest-fsfreeze-freeze\"}'" in l)
    thaw = next(k for k, l in enumerate(lines) if "Send command '{\"execute\":\"guest-fsfreeze-thaw\"}'" in l)
    # The thaw's reply is the next "Receive command reply" of the thread that sent it.
    tid = lines[thaw].split(": ")[1]
    reply = next(k for k in range(thaw, len(lines)) if f": {tid}: debug : qemuAgentCommandFull" in lines[k] and "Receive command reply" in lines[k])
    data = os.path.getsize(f"{work}/vnb-full{i}/vda.full.data")
    t0, t1 = times[i]
    rows.append({"run": i, "freeze_window_ms": round((ts(lines[reply]) - ts(lines[freeze])) * 1e3, 1),
                 "wall_s": round(t1 - t0, 3), "vda_full_data_bytes": data})
med = lambda k: statistics.median(r[k] for r in rows)
print(json.dumps({"runs": n, "median": {"freeze_window_ms": med("freeze_window_ms"), "wall_s": med("wall_s")}, "rows": rows}, indent=2))
EOF
cat vnb.json
python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["median"], indent=2))' cairn.json
log "results in $WORK (cairn.json, vnb.json, machine.txt)"
