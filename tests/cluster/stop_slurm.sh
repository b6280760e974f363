#!/usr/bin/env bash
# Stop what start_slurm.sh started (the installed packages and the accounting database stay).
set -u
scancel --user=root >/dev/null 2>&1 || true
for daemon in slurmd slurmctld slurmdbd; do pkill -x "$daemon" || true; done
mariadb-admin shutdown >/dev/null 2>&1 || pkill -x mariadbd || true
pkill -x munged || true
for _ in $(seq 40); do
  running=0
  for daemon in slurmd slurmctld slurmdbd mariadbd munged; do pgrep -x "$daemon" >/dev/null && running=1; done
  [ "$running" -eq 0 ] && exit 0
  sleep 0.25
done
exit 0
