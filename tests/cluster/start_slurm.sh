#!/usr/bin/env bash
# Start a one-node SLURM cluster with accounting (munge, MariaDB, slurmdbd, slurmctld, slurmd) on a
# Debian machine, as root, without systemd. Idempotent: what already runs is left running.
# The node advertises one fake GPU (gres on /dev/null) so GPU rules are scheduled as on a real
# cluster. Facts for Debian 12 / SLURM 22.05: proctrack/linuxproc and task/none work without
# cgroups; RealMemory must not exceed what `slurmd -C` reports; DefMemPerCPU stops a job from
# taking the whole node.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "start_slurm.sh: run as root" >&2; exit 1; }

packages="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
# A little under what slurmd sees, so the node is never refused for claiming too much.
memory=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') * 9 / 10 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/slurm
chown munge:munge /run/munge && chmod 755 /run/munge

# munge: the key the package made, or a new one.
[ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

# MariaDB for slurmdbd (accounting, as on a real cluster: sacct works).
if ! pgrep -x mariadbd >/dev/null; then
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  (mariadbd-safe --user=mysql >/dev/null 2>&1 &)
  for _ in $(seq 60); do mariadb -e "select 1" >/dev/null 2>&1 && break; sleep 0.5; done
fi
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmci';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmci
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
CONF
chmod 600 /etc/slurm/slurmdbd.conf

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
DefMemPerCPU=1000
MinJobAge=3600
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$memory Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
echo "Name=gpu File=/dev/null" > /etc/slurm/gres.conf

pgrep -x slurmdbd >/dev/null || /usr/sbin/slurmdbd
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -i add cluster ci >/dev/null 2>&1 || true
sacctmgr -i add account ci Cluster=ci Description=ci Organization=ci >/dev/null 2>&1 || true
sacctmgr -i add user root Account=ci >/dev/null 2>&1 || true
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 60); do
  state=$(sinfo -h -N -o %t 2>/dev/null | head -n1)
  case "$state" in idle|mix|alloc) echo "slurm: node $host $state, $cpus CPUs, ${memory} MB, gpu:1 (fake)"; exit 0 ;; esac
  scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
  sleep 0.5
done
echo "slurm did not come up; see /var/log/slurm/" >&2
tail -n 20 /var/log/slurm/*.log >&2 || true
exit 1
