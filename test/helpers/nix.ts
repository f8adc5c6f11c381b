// Fake NixOS toplevels built with real Nix. Each is a derivation whose own `switch-to-configuration`
// records every call, updates the scratch `currentSystem` link like NixOS's activation does, and can
// fail, hang or exit 4. Bootloader, real switch and reboot are the simulated parts; the agent's code
// path (run the toplevel's script) is the production one.

import { execFileSync } from 'node:child_process';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { arch } from 'node:os';

/** Real Nix, offline, as root without a daemon or build users (TESTBED.md). */
export const NIX_CONFIG = 'sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes\n';
process.env.NIX_CONFIG = NIX_CONFIG;

export const SYSTEM = `${arch() === 'arm64' ? 'aarch64' : 'x86_64'}-linux`;

export function haveNix(): string | undefined {
  try {
    execFileSync('nix-store', ['--version'], { stdio: 'ignore' });
    return undefined;
  } catch {
    return 'Nix is not installed (apt-get install nix-bin): skipping tests that need real Nix';
  }
}

export interface Behaviour {
  /** shell run on `test`/`switch` before the current-system link moves (e.g. `exit 2`, `sleep 600`) */
  beforeLink?: string;
  /** shell run on `test`/`switch` after the link moved (e.g. `exit 4`) */
  afterLink?: string;
  /** shell run on `boot` (e.g. `exit 1`) */
  boot?: string;
  /** leave out bin/switch-to-configuration: not a toplevel */
  notToplevel?: boolean;
  /** a real closure to push: the toplevel references this many dependency paths (see closureExpr) */
  closure?: Closure;
  /**
   * The kernel side (DESIGN §11): the toplevel gets `kernel`, `initrd` and `kernel-params` files
   * whose contents derive from this; toplevels with the same value have the same kernel side.
   */
  kernel?: string;
  /** the simulated bootloader of the test bed starts this system but never its agent (a boot that hangs) */
  hangsAtBoot?: boolean;
}

/**
 * `paths` dependency store paths of `sizeKiB` each, incompressible and deterministic: AES-128-CTR
 * of zeros under a key derived from `seed` and the index, so the same seed gives the same paths
 * (and the same bytes) in any store, and another seed other paths. The default seed is the
 * toplevel's name.
 */
export interface Closure {
  paths: number;
  sizeKiB: number;
  seed?: string;
}

/** The shell script a fake toplevel runs as `bin/switch-to-configuration`. */
export function switchScript(calls: string, current: string, b: Behaviour): string {
  return `#!/bin/sh
self=$(cd "$(dirname "$0")/.." && pwd)
echo "$self $1" >> ${calls}
case "$1" in
  test|switch)
    ${b.beforeLink ?? ':'}
    ln -sfn "$self" ${current}
    ${b.afterLink ?? ':'}
    ;;
  boot)
    ${b.boot ?? ':'}
    ;;
  dry-activate)
    echo "would restart the following units: demo.service"
    ;;
esac
exit 0
`;
}

/** The Nix expression of a fake toplevel (pure: usable from a flake). */
export function toplevelExpr(name: string, scriptFile: string | null, closure?: Closure, boot: Pick<Behaviour, 'kernel' | 'hangsAtBoot'> = {}): string {
  let install = scriptFile
    ? '/bin/mkdir -p $out/bin && printf "%s" "$script" > $out/bin/switch-to-configuration && /bin/chmod +x $out/bin/switch-to-configuration'
    : '/bin/mkdir -p $out/share && echo not-a-toplevel > $out/share/readme';
  // Writing the dependencies' paths into $out is what makes them references of the toplevel.
  if (closure) install += ' && /bin/mkdir -p $out/share && for d in $deps; do echo $d; done > $out/share/closure';
  if (boot.kernel !== undefined) {
    const k = boot.kernel.replace(/[^\w.-]/g, '_');
    install += ` && echo kernel-${k} > $out/kernel && echo initrd-${k} > $out/initrd && echo 'quiet kernel=${k}' > $out/kernel-params`;
  }
  if (boot.hangsAtBoot) install += ' && echo hangs > $out/testbed-hang';
  return `${closure ? `let
${closureExpr(closure.seed ?? name, closure)}
in ` : ''}derivation {
  name = "nixos-system-${name}";
  system = "${SYSTEM}";
  builder = "/bin/sh";
  args = [ "-c" ${JSON.stringify(install)} ];
  ${scriptFile ? `script = builtins.readFile ./${scriptFile};` : ''}
  ${closure ? 'deps = builtins.genList dep paths;' : ''}
}
`;
}

/** A Nix string literal of `s`. */
function nixString(s: string): string {
  return `"${s.replace(/[\\"$]/g, (c) => `\\${c}`)}"`;
}

/** `dep i`: the i-th dependency path of a closure (see Closure); binds `dep` and `paths`. */
function closureExpr(seed: string, c: Closure): string {
  if (!Number.isInteger(c.paths) || c.paths < 0 || !Number.isInteger(c.sizeKiB) || c.sizeKiB < 0) throw new Error(`bad closure ${JSON.stringify(c)}`);
  const bytes = c.sizeKiB * 1024;
  // openssl failing would leave a short file: the size check fails the build instead.
  const fill = `/usr/bin/openssl enc -aes-128-ctr -nosalt -K "$key" -iv 00000000000000000000000000000000 < /dev/zero 2>/dev/null | /usr/bin/head -c ${bytes} > $out && test "$(/usr/bin/wc -c < $out)" -eq ${bytes}`;
  return `  paths = ${c.paths};
  dep = i: derivation {
    name = "closure-dep-\${toString i}";
    system = "${SYSTEM}";
    builder = "/bin/sh";
    args = [ "-c" ${JSON.stringify(fill)} ];
    key = builtins.substring 0 32 (builtins.hashString "sha256" (${nixString(seed)} + "-" + toString i));
  };`;
}

/** Runs CMD ARGS somewhere (here, or inside a scratch host's mount namespace) and returns its stdout, trimmed. */
export type Runner = (cmd: string, args: string[]) => string;

export const runHere: Runner = (cmd, args) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();

/**
 * Builds a fake toplevel in `dir` and returns its store path (not rooted: tests may delete it).
 * `run` picks the store: by default the test process's own (the operator's).
 */
export function buildToplevel(dir: string, name: string, calls: string, current: string, b: Behaviour = {}, run: Runner = runHere): string {
  mkdirSync(dir, { recursive: true });
  const script = `${name}.sh`;
  writeFileSync(join(dir, script), switchScript(calls, current, b));
  writeFileSync(join(dir, `${name}.nix`), toplevelExpr(name, b.notToplevel ? null : script, b.closure, b));
  return run('nix-build', [join(dir, `${name}.nix`), '--no-out-link']);
}

export interface FlakeShape {
  /** the toplevel attribute is a store path that is only a symlink to the fake toplevel */
  link?: boolean;
  /** the fake toplevel is also the flake's default package (what a bare `nix build` builds) */
  defaultPackage?: boolean;
}

/** Writes a `path:` flake whose nixosConfigurations.HOST toplevel is a fake toplevel; returns its ref. */
export function writeFlake(dir: string, host: string, calls: string, current: string, b: Behaviour = {}, shape: FlakeShape = {}): string {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'switch.sh'), switchScript(calls, current, b));
  writeFileSync(join(dir, 'toplevel.nix'), toplevelExpr(`${host}-flake`, 'switch.sh', b.closure));
  const link = `derivation {
      name = "nixos-system-${host}-link";
      system = "${SYSTEM}";
      builder = "/bin/sh";
      args = [ "-c" "/bin/ln -s \${toplevel} $out" ];
    }`;
  writeFileSync(
    join(dir, 'flake.nix'),
    `{
  outputs = { self }: let toplevel = import ./toplevel.nix; in {
    nixosConfigurations.${host}.config.system.build.toplevel = ${shape.link ? link : 'toplevel'};
    ${shape.defaultPackage ? `packages.${SYSTEM}.default = toplevel;\n    defaultPackage.${SYSTEM} = toplevel;` : ''}
  };
}
`,
  );
  return `path:${dir}`;
}

/** Adds a symlink named NAME pointing at `target` to the store (`nix-store --add`): a store path that is a link. */
export function storeLink(dir: string, name: string, target: string): string {
  mkdirSync(dir, { recursive: true });
  const link = join(dir, name);
  symlinkSync(target, link);
  return nixStore(['--add', link]);
}

export function nixStore(args: string[]): string {
  return execFileSync('nix-store', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}

export function nix(args: string[]): string {
  return execFileSync('nix', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}
