#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster on 127.0.0.1 (Debian's slurmctld, slurmd, munge), for
# the tests and CI. Idempotent: a running cluster is left alone. Needs root and apt.
#   scripts/slurm_ci_up.sh        start (installing the packages when missing)
#   scripts/slurm_ci_up.sh down   stop the daemons it started
set -euo pipefail

if [[ "${1:-up}" == down ]]; then
    for pidfile in /var/spool/slurmd/slurmd.pid /var/spool/slurmctld/slurmctld.pid \
                   /run/munge/munged.pid; do
        [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    exit 0
fi

if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "slurm_ci_up.sh: needs root to install and start slurmctld/slurmd/munged" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

H=$(hostname -s)
NCPU=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MailProg=/bin/true
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/var/spool/slurmctld/slurmctld.pid
SlurmdPidFile=/var/spool/slurmd/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 1 120); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        exit 0
    fi
    sleep 0.5
done
echo "slurm_ci_up.sh: the node did not become idle within 60 s; see /var/log/slurm" >&2
exit 1
