// The one simulated part of a trial boot (DESIGN §11): the bootloader. Entries, the default and
// the one-shot entry are files in a directory; a stand-in `bootctl` (is-installed, set-oneshot,
// set-default) writes them; the fake toplevels' `switch-to-configuration boot` writes one entry per
// profile generation and makes its own generation the default, as NixOS's systemd-boot builder does;
// a boot starts the one-shot entry (consumed on use) or else the default.

import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export class SimulatedLoader {
  /** `entries/nixos-generation-N.conf` (holding the toplevel's path), `default`, `oneshot`, `bootctl.log` */
  readonly dir: string;
  constructor(dir: string) {
    this.dir = dir;
    mkdirSync(join(dir, 'entries'), { recursive: true });
  }

  /** The stand-in `bootctl` (and a `reboot` that only records the request) in `binDir`. */
  installCommands(binDir: string): { bootctl: string; reboot: string } {
    mkdirSync(binDir, { recursive: true });
    const bootctl = join(binDir, 'bootctl');
    writeFileSync(bootctl, bootctlScript(this.dir));
    chmodSync(bootctl, 0o755);
    const reboot = join(binDir, 'reboot');
    writeFileSync(reboot, `#!/bin/sh\necho "$$" > ${this.dir}/reboot-requested\n`);
    chmodSync(reboot, 0o755);
    return { bootctl, reboot };
  }

  /** The `boot` mode of a fake toplevel whose profile is `profile` (Behaviour.boot). */
  bootScript(profile: string): string {
    return builderScript(this.dir, profile);
  }

  get oneShot(): string | undefined {
    return read(join(this.dir, 'oneshot'));
  }

  get default(): string | undefined {
    return read(join(this.dir, 'default'));
  }

  commands(): string[] {
    return readFileSync(join(this.dir, 'bootctl.log'), 'utf8').split('\n').filter(Boolean);
  }

  /** The toplevel of `entry`, if it exists. */
  system(entry: string | undefined): string | undefined {
    return entry ? read(join(this.dir, 'entries', entry)) : undefined;
  }

  get rebootRequested(): boolean {
    return existsSync(join(this.dir, 'reboot-requested'));
  }

  /** What the firmware would start now: the one-shot entry (and forget it), else the default. */
  pick(): string {
    const once = this.oneShot;
    rmSync(join(this.dir, 'oneshot'), { force: true });
    rmSync(join(this.dir, 'reboot-requested'), { force: true });
    const system = this.system(once) ?? this.system(this.default);
    if (!system) throw new Error(`the simulated loader has nothing to boot (oneshot ${once}, default ${this.default})`);
    return system;
  }
}

function read(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
}

/** A stand-in for bootctl(1), for the commands Snapback uses. */
export function bootctlScript(dir: string): string {
  return `#!/bin/sh
# stand-in bootctl: the test bed's simulated systemd-boot (entries and variables are files in ${dir})
D=${dir}
echo "$*" >> $D/bootctl.log
case "$1" in
  is-installed) exit 0 ;;
  -p|--print-esp-path) echo $D/esp ;;
  set-oneshot|set-default)
    f=$D/oneshot; [ "$1" = set-default ] && f=$D/default
    if [ -z "$2" ]; then rm -f $f; exit 0; fi
    [ -e "$D/entries/$2" ] || { echo "bootctl: no boot entry $2" >&2; exit 1; }
    echo "$2" > $f.tmp && mv $f.tmp $f ;;
  *) echo "stand-in bootctl: $1 is not simulated" >&2; exit 1 ;;
esac
`;
}

/**
 * NixOS's systemd-boot builder in a few lines: an entry per generation; the default is this
 * toplevel's. Like the real one, it writes the entries first (each replaced whole) and removes the
 * stale ones after: at no moment is the default's entry missing.
 */
export function builderScript(dir: string, profile: string): string {
  return `E=${dir}/entries; mkdir -p $E; def=; keep=
    for l in ${profile}-*-link; do
      [ -e "$l" ] || continue
      n=\${l##*/}; n=\${n%-link}; n=\${n##*-}
      t=$(readlink -f "$l"); echo "$t" > $E/.tmp-$n && mv -f $E/.tmp-$n $E/nixos-generation-$n.conf
      keep="$keep nixos-generation-$n.conf "
      [ "$t" = "$self" ] && def=nixos-generation-$n.conf
    done
    for f in $E/nixos-generation-*.conf; do
      [ -e "$f" ] || continue
      case "$keep" in *" \${f##*/} "*) ;; *) rm -f "$f" ;; esac
    done
    [ -n "$def" ] && echo "$def" > ${dir}/default && mkdir -p ${dir}/esp/loader && echo "default $def" > ${dir}/esp/loader/loader.conf`;
}
