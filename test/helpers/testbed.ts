// Test hosts with real systemd as PID 1 (TESTBED.md): a Debian root file system built once per
// machine with debootstrap, an overlay per host (so hosts share nothing and the pristine tree stays
// pristine), its own PID, mount, UTS, IPC and network namespaces, the project bind-mounted read-only.
// Power loss is `kill -9` of the host's PID 1; booting again reuses the overlay's upper layer, so
// /var persists and /run is new — a reboot. `systemctl reboot` inside a host is a real reboot too:
// PID 1 exits on SIGHUP (reboot(2) in a PID namespace) and the host boots again. Simulated, and
// only this: the bootloader (a boot-time unit points /run/current-system and /run/booted-system at
// the profile's generation, or with `loader` at what the simulated systemd-boot picks: the one-shot
// entry, consumed, else the default; helpers/loader.ts) and the boot id (a fresh uuid per boot,
// because the kernel's does not change).

import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, rmdirSync, writeFileSync, chmodSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ROOT } from './host.ts';
import { switchScript, toplevelExpr, type Behaviour } from './nix.ts';
import { bootctlScript, builderScript } from './loader.ts';

/** The simulated systemd-boot's files inside a host with `loader` (entries, default, oneshot). */
export const LOADER_DIR = '/boot/snapback-testbed';
const PROFILE = '/nix/var/nix/profiles/system';

/** Where the machine's cgroup2 hierarchy is mounted (hybrid or unified layout). */
const CGROUP2 = existsSync('/sys/fs/cgroup/unified/cgroup.procs') ? '/sys/fs/cgroup/unified' : '/sys/fs/cgroup';

export const TESTBED_CACHE = process.env.SNAPBACK_TESTBED_CACHE ?? '/var/cache/snapback-testbed';
const PACKAGES = 'systemd,systemd-sysv,dbus,iproute2,nftables,nix-bin,libdbi-perl,util-linux';

/** Why the test bed cannot run here, or undefined. */
export function testbedUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'the test bed needs root';
  for (const tool of ['unshare', 'nsenter', 'mount', 'ip']) {
    try {
      execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    } catch {
      return `the test bed needs ${tool}`;
    }
  }
  if (!existsSync(join(TESTBED_CACHE, 'rootfs', '.snapback-ready'))) {
    try {
      execFileSync('sh', ['-c', 'command -v debootstrap'], { stdio: 'ignore' });
    } catch {
      return `no cached root file system in ${TESTBED_CACHE} and no debootstrap to build one (apt-get install debootstrap)`;
    }
  }
  try {
    execFileSync('unshare', ['--pid', '--fork', '--mount', '--net', '--cgroup', 'true'], { stdio: 'ignore' });
  } catch {
    return 'cannot create PID, mount, network and cgroup namespaces here';
  }
  const probe = mkdtempSync(join('/tmp', 'snapback-tb-probe-'));
  try {
    for (const d of ['lower', 'upper', 'work', 'merged']) mkdirSync(join(probe, d));
    execFileSync('unshare', ['--mount', 'sh', '-c', `mount -t overlay overlay -o lowerdir=${probe}/lower,upperdir=${probe}/upper,workdir=${probe}/work ${probe}/merged`], { stdio: 'ignore' });
  } catch {
    return 'cannot mount overlayfs here';
  } finally {
    rmSync(probe, { recursive: true, force: true });
  }
  return undefined;
}

/** Why the test bed cannot run here, after building its root file system once per machine (debootstrap, 1-2 minutes); undefined when it can. */
export function testbedSkip(haveNix: () => string | undefined): string | undefined {
  const missing = testbedUnavailable() ?? haveNix();
  if (missing) return missing;
  try {
    ensureRootfs();
  } catch (err) {
    return `cannot build the test host's root file system: ${(err as Error).message.split('\n')[0]}`;
  }
  return undefined;
}

/** The pristine Debian tree with systemd and Nix; built once per machine (1-2 minutes), then reused. */
export function ensureRootfs(): string {
  const rootfs = join(TESTBED_CACHE, 'rootfs');
  if (existsSync(join(rootfs, '.snapback-ready'))) return rootfs;
  mkdirSync(TESTBED_CACHE, { recursive: true });
  const tmp = `${rootfs}.tmp`;
  rmSync(tmp, { recursive: true, force: true });
  execFileSync('debootstrap', ['--variant=minbase', `--include=${PACKAGES}`, 'bookworm', tmp], { stdio: 'ignore', timeout: 15 * 60_000 });
  writeFileSync(join(tmp, '.snapback-ready'), `${PACKAGES}\n`);
  rmSync(rootfs, { recursive: true, force: true });
  renameSync(tmp, rootfs);
  return rootfs;
}

const BOOT_SH = `#!/bin/sh
# boot.sh ROOT LOWER UPPER WORK PROJECT — run inside fresh namespaces; mounts die with them.
set -e
R=$1
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$2,upperdir=$3,workdir=$4" "$R"
mount -t proc proc "$R/proc"
# A fresh sysfs: systemd mounts its own cgroup2 there, which inside the cgroup namespace shows
# only this host's cgroup, so hosts (and boots) never share cgroups.
mount -t sysfs sysfs "$R/sys"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
mount --rbind /dev "$R/dev"
mkdir -p "$R/opt/snapback"
mount --bind "$5" "$R/opt/snapback"
mount -o remount,bind,ro "$R/opt/snapback"
export container=other
exec chroot "$R" /lib/systemd/systemd
`;

/** The simulated bootloader and boot id, run at every boot before the agent. */
const TESTBED_BOOT_UNIT = `[Unit]
Description=test bed: simulated bootloader (current-system = the profile's generation) and boot id
DefaultDependencies=no
After=local-fs.target
Before=snapback-agent.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh /etc/snapback-testbed/boot.sh

[Install]
WantedBy=multi-user.target
`;

/**
 * What the firmware and the bootloader would do: the boot id, then the system to run — with the
 * simulated systemd-boot, its one-shot entry (consumed on use) or else its default; without it, the
 * profile's generation. A system marked `testbed-hang` boots but never starts the agent.
 */
const BOOT_SCRIPT = `set -e
mkdir -p /run/snapback-testbed
cat /proc/sys/kernel/random/uuid > /run/snapback-testbed/boot_id
D=${LOADER_DIR}
system=
if [ -d $D/entries ]; then
  if [ -s $D/oneshot ]; then
    entry=$(cat $D/oneshot); rm -f $D/oneshot
    [ -s "$D/entries/$entry" ] && system=$(cat "$D/entries/$entry")
  fi
  if [ -z "$system" ] && [ -s $D/default ]; then system=$(cat "$D/entries/$(cat $D/default)"); fi
elif [ -e ${PROFILE} ]; then
  system=$(readlink -f ${PROFILE})
fi
if [ -n "$system" ]; then
  ln -sfn "$system" /run/current-system
  ln -sfn "$system" /run/booted-system
  echo "$system" >> /var/lib/testbed-boots.log
  if [ -e "$system/testbed-hang" ]; then touch /run/snapback-testbed/hang; fi
fi
`;

export const AGENT_CONFIG = {
  stateDir: '/var/lib/snapback',
  controlSocket: '/run/snapback/control.sock',
  system: { runner: 'systemd', bootIdFile: '/run/snapback-testbed/boot_id' },
  confirm: { defaultTimeoutSec: 60, minTimeoutSec: 1, maxTimeoutSec: 600, activationTimeoutSec: 60 },
  log: { level: 'debug' },
};

export class TestHost {
  readonly dir: string;
  readonly root: string;
  private readonly upper: string;
  private readonly work: string;
  private readonly lower: string;
  private unshare: ChildProcess | undefined;
  private readonly cgroups: string[] = [];
  readonly name: string;
  /** n: a veth pair, 10.231.n.1 on the machine, 10.231.n.2 in the host (re-created at every boot) */
  network: number | undefined;
  pid1 = 0;
  /** the simulated systemd-boot is installed (create's `loader`) */
  loader = false;
  /** completed boots; a reboot asked for inside the host (PID 1 exits on SIGHUP) boots it again */
  boots = 0;
  private rebooting: Promise<void> | undefined;
  private rebootError: Error | undefined;

  private constructor(name: string, lower: string) {
    this.name = name;
    this.dir = mkdtempSync(join('/tmp', `snapback-tb-${name}-`));
    this.lower = lower;
    this.root = join(this.dir, 'root');
    this.upper = join(this.dir, 'upper');
    this.work = join(this.dir, 'work');
    for (const d of [this.root, this.upper, this.work]) mkdirSync(d);
  }

  /** A new host: the shipped unit file, the agent's config, Nix config, then the first boot. */
  static async create(
    name: string,
    opts: {
      dropIn?: string;
      config?: Record<string, unknown>;
      files?: Record<string, { text: string; mode?: number }>;
      network?: number;
      /** the simulated systemd-boot: a stand-in bootctl, and boots that start what it picks */
      loader?: boolean;
    } = {},
  ): Promise<TestHost> {
    const h = new TestHost(name, ensureRootfs());
    h.network = opts.network;
    h.loader = opts.loader ?? false;
    const put = (path: string, text: string, mode = 0o644) => {
      const full = join(h.upper, path);
      mkdirSync(join(full, '..'), { recursive: true });
      writeFileSync(full, text);
      chmodSync(full, mode);
    };
    put('usr/local/bin/snapback-agent', '#!/bin/sh\nexec /opt/snapback/node_modules/.bin/node /opt/snapback/bin/snapback-agent.js "$@"\n', 0o755);
    // The plain unit file we ship for non-NixOS hosts, unchanged; the test's settings are a drop-in.
    put('usr/lib/systemd/system/snapback-agent.service', readFileSync(join(ROOT, 'systemd', 'snapback-agent.service'), 'utf8'));
    // Debian's Nix here is single-user, without a daemon: the agent opens the store itself.
    // A boot that "hangs" (the simulated loader started a system marked testbed-hang) never starts the agent.
    put(
      'etc/systemd/system/snapback-agent.service.d/testbed.conf',
      `[Unit]\nConditionPathExists=!/run/snapback-testbed/hang\n[Service]\nEnvironment=SNAPBACK_DEBUG_FREEZE=1\nUnsetEnvironment=NIX_REMOTE\n${opts.dropIn ?? ''}`,
    );
    put('etc/systemd/system/snapback-testbed-boot.service', TESTBED_BOOT_UNIT);
    put('etc/snapback-testbed/boot.sh', BOOT_SCRIPT);
    if (h.loader) {
      put('usr/local/bin/bootctl', bootctlScript(LOADER_DIR), 0o755);
      mkdirSync(join(h.upper, LOADER_DIR.slice(1), 'entries'), { recursive: true });
    }
    const wants = join(h.upper, 'etc/systemd/system/multi-user.target.wants');
    mkdirSync(wants, { recursive: true });
    execFileSync('ln', ['-s', '/etc/systemd/system/snapback-testbed-boot.service', join(wants, 'snapback-testbed-boot.service')]);
    execFileSync('ln', ['-s', '/usr/lib/systemd/system/snapback-agent.service', join(wants, 'snapback-agent.service')]);
    put('etc/snapback/agent.json', JSON.stringify({ ...AGENT_CONFIG, ...opts.config }, null, 2));
    put('etc/nix/nix.conf', 'sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes\n');
    put('etc/hostname', `${name}\n`);
    for (const [path, f] of Object.entries(opts.files ?? {})) put(path.replace(/^\//, ''), f.text, f.mode ?? 0o644);
    // Units that make no sense in a container test host.
    for (const unit of ['nftables.service', 'systemd-timesyncd.service', 'getty@tty1.service', 'console-getty.service']) {
      execFileSync('ln', ['-sf', '/dev/null', join(h.upper, 'etc/systemd/system', unit)]);
    }
    await h.boot();
    return h;
  }

  /** Boots (again) on the same upper layer: /var persists, /run is new. */
  async boot(): Promise<void> {
    const script = join(this.dir, 'boot.sh');
    writeFileSync(script, BOOT_SH, { mode: 0o755 });
    // Each boot gets its own cgroup, the root of the host's cgroup namespace.
    const cgroup = join(CGROUP2, `snapback-tb-${this.name}-${Date.now().toString(36)}`);
    mkdirSync(cgroup);
    this.cgroups.push(cgroup);
    const child = spawn(
      'sh',
      ['-c', 'echo $$ > "$0/cgroup.procs" && shift 0 && exec unshare --cgroup --pid --fork --mount --uts --ipc --net "$@"', cgroup, script, this.root, this.lower, this.upper, this.work, ROOT],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    this.unshare = child;
    // reboot(2) inside a PID namespace ends its PID 1 with SIGHUP (power-off: SIGINT), and unshare
    // passes that on: the machine "restarts" — the harness boots the host again.
    child.once('exit', (_code, signal) => {
      if (this.unshare !== child || signal !== 'SIGHUP') return;
      this.unshare = undefined;
      const again: Promise<void> = this.boot()
        .catch((err: Error) => void (this.rebootError = err))
        .finally(() => {
          if (this.rebooting === again) this.rebooting = undefined;
        });
      this.rebooting = again;
    });
    let stderr = '';
    child.stderr!.on('data', (c) => (stderr += c));
    // PID 1 of the host is the child of `unshare`.
    for (let i = 0; ; i++) {
      const children = readChildren(child.pid!);
      if (children.length) {
        this.pid1 = children[0]!;
        break;
      }
      if (child.exitCode !== null || i > 200) throw new Error(`the test host did not boot: ${stderr}`);
      await sleep(25);
    }
    if (this.network !== undefined) this.plugNetwork(this.network);
    await this.until(() => {
      const r = this.sh('systemctl is-system-running 2>/dev/null || true');
      return /^(running|degraded)/.test(r);
    }, 60_000, 'systemd to finish booting');
    this.boots++;
  }

  /** Waits until the host has booted more than `count` times in all (a reboot from inside it). */
  async booted(count: number, timeoutMs = 120_000): Promise<void> {
    const start = Date.now();
    while (this.boots <= count) {
      if (this.rebootError) throw this.rebootError;
      if (Date.now() - start > timeoutMs) throw new Error(`the host did not boot a ${count + 1}th time in ${timeoutMs} ms`);
      if (this.rebooting) await this.rebooting;
      else await sleep(100);
    }
  }

  /** The systems the host booted, in order (the simulated loader's log). */
  bootLog(): string[] {
    return this.sh('cat /var/lib/testbed-boots.log 2>/dev/null || true').split('\n').filter(Boolean);
  }

  /** The simulated loader's state: its default and one-shot entries. */
  loaderState(): { default?: string; oneShot?: string; entries: string[] } {
    const read = (f: string) => this.sh(`cat ${LOADER_DIR}/${f} 2>/dev/null || true`).trim() || undefined;
    const entries = this.sh(`ls ${LOADER_DIR}/entries 2>/dev/null || true`).split('\n').filter(Boolean);
    const d = read('default');
    const o = read('oneshot');
    return { ...(d ? { default: d } : {}), ...(o ? { oneShot: o } : {}), entries };
  }

  /** The host's address on its veth link (TESTBED.md: network namespaces). */
  get address(): string {
    return `10.231.${this.network}.2`;
  }

  private plugNetwork(n: number): void {
    const outside = `sb-h${n}a`;
    const inside = `sb-h${n}b`;
    execFileSync('sh', ['-c', `ip link del ${outside} 2>/dev/null; true`]);
    execFileSync('ip', ['link', 'add', outside, 'type', 'veth', 'peer', 'name', inside]);
    execFileSync('ip', ['link', 'set', inside, 'netns', String(this.pid1)]);
    execFileSync('ip', ['addr', 'add', `10.231.${n}.1/30`, 'dev', outside]);
    execFileSync('ip', ['link', 'set', outside, 'up']);
    this.sh(`ip link set lo up && ip addr add ${this.address}/30 dev ${inside} && ip link set ${inside} up`);
  }

  /** Runs a shell command inside the host as root; returns stdout (throws on failure). */
  sh(cmd: string, opts: { timeoutMs?: number } = {}): string {
    return execFileSync('nsenter', ['-t', String(this.pid1), '-p', '-m', '-u', '-i', '-n', '-r', '-w', '/bin/sh', '-c', cmd], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: opts.timeoutMs ?? 60_000,
      env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', HOME: '/root' },
    });
  }

  /** Like `sh` but returns the exit status and output instead of throwing. */
  try(cmd: string): { code: number; out: string } {
    try {
      return { code: 0, out: this.sh(cmd) };
    } catch (err) {
      const e = err as { status?: number; stdout?: string; stderr?: string };
      return { code: e.status ?? -1, out: `${e.stdout ?? ''}${e.stderr ?? ''}` };
    }
  }

  /** `snapback-agent ARGS --json` inside the host. */
  agent(args: string): { code: number; out: any } {
    const r = this.try(`snapback-agent ${args} --json`);
    let out: unknown;
    try {
      out = JSON.parse(r.out.trim().split('\n').at(-1) ?? '');
    } catch {
      out = r.out;
    }
    return { code: r.code, out };
  }

  show(unit: string, props: string[]): Record<string, string> {
    const out = this.sh(`systemctl show ${unit} ${props.map((p) => `-p ${p}`).join(' ')}`);
    return Object.fromEntries(out.trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
  }

  /** Builds a fake toplevel with the host's own Nix; returns its store path. */
  toplevel(name: string, b: Behaviour = {}): string {
    const dir = '/var/lib/testbed/nix';
    const calls = '/var/lib/testbed/calls.log';
    this.sh(`mkdir -p ${dir} && touch ${calls}`);
    const boot = this.loader && b.boot === undefined ? { boot: builderScript(LOADER_DIR, PROFILE) } : {};
    writeFileSync(join(this.upper, 'var/lib/testbed/nix', `${name}.sh`), switchScript(calls, '/run/current-system', { ...b, ...boot }));
    writeFileSync(join(this.upper, 'var/lib/testbed/nix', `${name}.nix`), toplevelExpr(name, b.notToplevel ? null : `${name}.sh`, undefined, b));
    return this.sh(`nix-build ${dir}/${name}.nix --no-out-link 2>/dev/null`, { timeoutMs: 120_000 }).trim();
  }

  /** A `path:` flake inside the host whose nixosConfigurations.HOST is a fake toplevel; returns its ref. */
  flake(host: string, b: Behaviour = {}): string {
    const dir = '/var/lib/testbed/flake';
    this.sh(`mkdir -p ${dir}`);
    const outside = join(this.upper, dir.slice(1));
    writeFileSync(join(outside, 'switch.sh'), switchScript('/var/lib/testbed/calls.log', '/run/current-system', b));
    writeFileSync(join(outside, 'toplevel.nix'), toplevelExpr(`${host}-flake`, 'switch.sh'));
    writeFileSync(join(outside, 'flake.nix'), `{ outputs = { self }: { nixosConfigurations.${host}.config.system.build.toplevel = import ./toplevel.nix; }; }\n`);
    return `path:${dir}`;
  }

  /** The "installed" system: generation 1 of the profile, running. */
  install(b: Behaviour = {}): string {
    const gen1 = this.toplevel('gen1', b);
    this.sh(`nix-env -p /nix/var/nix/profiles/system --set ${gen1} && ln -sfn ${gen1} /run/current-system && ln -sfn ${gen1} /run/booted-system`);
    // As at installation: the bootloader's entries and default (the calls log starts empty).
    if (this.loader) this.sh(`${gen1}/bin/switch-to-configuration boot && : > /var/lib/testbed/calls.log`);
    return gen1;
  }

  switchCalls(): [string, string][] {
    return this.sh('cat /var/lib/testbed/calls.log')
      .split('\n')
      .filter(Boolean)
      .map((l) => l.split(' ') as [string, string]);
  }

  running(): string {
    return this.sh('readlink -f /run/current-system').trim();
  }

  history(): any[] {
    return this.sh('cat /var/lib/snapback/history.jsonl 2>/dev/null || true')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l));
  }

  async until(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const start = Date.now();
    for (;;) {
      let ok = false;
      try {
        ok = cond();
      } catch {}
      if (ok) return;
      if (Date.now() - start > timeoutMs) {
        const journal = this.try('journalctl --no-pager -n 40 -u snapback-agent').out;
        throw new Error(`timed out waiting for ${what}; the agent's journal:\n${journal}`);
      }
      await sleep(100);
    }
  }

  /** Power loss: PID 1 dies with everything in the host. */
  async powerOff(): Promise<void> {
    if (this.rebooting) await this.rebooting;
    const child = this.unshare;
    if (!child || child.exitCode !== null) return;
    const gone = new Promise((r) => child.once('exit', r));
    try {
      process.kill(this.pid1, 'SIGKILL');
    } catch {}
    await gone;
    this.unshare = undefined;
  }

  async destroy(): Promise<void> {
    await this.powerOff();
    if (this.network !== undefined) execFileSync('sh', ['-c', `ip link del sb-h${this.network}a 2>/dev/null; true`]);
    for (const cg of this.cgroups) removeCgroup(cg);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Empty cgroups are removed bottom-up with rmdir (their files cannot be deleted). */
function removeCgroup(dir: string): void {
  try {
    for (const e of readdirSync(dir, { withFileTypes: true })) if (e.isDirectory()) removeCgroup(join(dir, e.name));
    rmdirSync(dir);
  } catch {}
}

function readChildren(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const task of readdirSync(`/proc/${pid}/task`)) {
      const text = readFileSync(`/proc/${pid}/task/${task}/children`, 'utf8').trim();
      if (text) out.push(...text.split(/\s+/).map(Number));
    }
  } catch {}
  return out;
}
