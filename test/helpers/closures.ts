// Closures of a given shape built in the operator's store without per-path builds.

import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ScratchHost } from './host.ts';
import { SYSTEM, switchScript } from './nix.ts';

/**
 * A fake toplevel referring to `n` tiny text paths (builtins.toFile: no builds, fast), unique to
 * this run. `extra` is more Nix for the derivation's attributes (e.g. another dependency).
 */
export function manyPathsToplevel(h: ScratchHost, name: string, n: number, extra = ''): string {
  const seed = `${name}-${process.pid}-${Date.now()}`;
  writeFileSync(join(h.dir, `${name}.sh`), switchScript(h.calls, h.current, {}));
  const install =
    '/bin/mkdir -p $out/bin $out/share && printf "%s" "$script" > $out/bin/switch-to-configuration && /bin/chmod +x $out/bin/switch-to-configuration && for d in $deps $more; do echo $d; done > $out/share/closure';
  writeFileSync(
    join(h.dir, `${name}.nix`),
    `derivation {
  name = "nixos-system-${name}";
  system = "${SYSTEM}";
  builder = "/bin/sh";
  args = [ "-c" ${JSON.stringify(install)} ];
  script = builtins.readFile ./${name}.sh;
  deps = builtins.genList (i: builtins.toFile "rv-dep-\${toString i}" "${seed} \${toString i}\\n") ${n};
  ${extra}
}
`,
  );
  return execFileSync('nix-build', [join(h.dir, `${name}.nix`), '--no-out-link'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}
