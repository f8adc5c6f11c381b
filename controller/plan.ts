// What each host will run, decided on the operator's machine before anything is sent: a flake
// built here and pushed (`buildOn: "local"`, the default) or built by the host itself; a store path
// of this machine pushed, or realised by the host from its own caches; a generation of the host's.

import { mkdtempSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from '../shared/exec.ts';
import { UsageError } from '../shared/cli.ts';
import { SnapbackError } from '../shared/errors.ts';
import type { Fleet } from '../shared/fleet.ts';
import { storePathSchema, type Target } from '../shared/model.ts';
import type { DeployEvent, PushPlan } from './deploy.ts';

const FLAKES = ['--extra-experimental-features', 'nix-command flakes'];

export interface PlanOptions {
  /** `--flake REF`: every host runs REF#<host> */
  flake?: string;
  /** a toplevel on the command line (`./result`, `/nix/store/…`): one host only */
  path?: string;
  buildOn?: 'local' | 'host';
  substitute?: boolean;
  emit: (e: DeployEvent) => void;
}

export interface Plan {
  targets: Map<string, Target>;
  pushes: Map<string, PushPlan>;
}

export async function planDeploy(fleet: Fleet, names: string[], opts: PlanOptions): Promise<Plan> {
  const targets = new Map<string, Target>();
  const pushes = new Map<string, PushPlan>();
  const builds: { name: string; installable: string }[] = [];
  const substituteFor = (name: string) => opts.substitute ?? fleet.hosts[name]!.substituteOnHost ?? fleet.defaults.substituteOnHost;

  if (opts.path !== undefined) {
    if (names.length !== 1) throw new UsageError(`a toplevel on the command line (${opts.path}) deploys one host, not ${names.length}`);
    const toplevel = localToplevel(opts.path);
    targets.set(names[0]!, { storePath: toplevel });
    pushes.set(names[0]!, { toplevel, substitute: substituteFor(names[0]!) });
    return { targets, pushes };
  }

  for (const name of names) {
    const host = fleet.hosts[name]!;
    const flake = opts.flake ? `${opts.flake}#${name}` : host.target && 'flake' in host.target ? host.target.flake : undefined;
    if (flake) {
      const buildOn = opts.buildOn ?? host.buildOn ?? fleet.defaults.buildOn;
      const hash = flake.lastIndexOf('#');
      const ref = flake.slice(0, hash);
      if (buildOn === 'host') {
        const why = localOnly(ref);
        if (why) throw new UsageError(`hosts.${name}: the flake "${ref}" ${why}, which the host cannot resolve; build it here and push it (--build-on local, the default)`);
        targets.set(name, { flake });
      } else {
        builds.push({ name, installable: `${ref}#nixosConfigurations.${flake.slice(hash + 1)}.config.system.build.toplevel` });
      }
      continue;
    }
    if (!host.target) throw new SnapbackError('config-invalid', `hosts.${name}.target is missing (or pass --flake REF, or a toplevel such as ./result)`);
    targets.set(name, host.target);
    // A store path this machine has is pushed; one it lacks is the host's to fetch from its caches.
    if ('storePath' in host.target && (await valid(host.target.storePath))) {
      pushes.set(name, { toplevel: host.target.storePath, substitute: substituteFor(name) });
    }
  }

  if (builds.length) {
    for (const b of builds) opts.emit({ type: 'building', host: b.name, installable: b.installable });
    const toplevels = await buildHere(builds.map((b) => b.installable));
    builds.forEach((b, i) => {
      const toplevel = toplevels[i]!;
      targets.set(b.name, { storePath: toplevel });
      pushes.set(b.name, { toplevel, substitute: substituteFor(b.name) });
    });
  }
  return { targets, pushes };
}

/** Why a flake reference names something only this machine has; undefined when the host can resolve it. */
export function localOnly(ref: string): string | undefined {
  if (ref === '.' || ref === '..' || ref.startsWith('./') || ref.startsWith('../')) return 'is a relative path on this machine';
  if (ref.startsWith('/') || ref.startsWith('path:') || ref.startsWith('git+file:') || ref.startsWith('file:')) return 'is a path on this machine';
  return undefined;
}

/** `./result` or a store path: resolved, and directly under the store. */
function localToplevel(path: string): string {
  let real: string;
  try {
    real = realpathSync(path);
  } catch (err) {
    throw new UsageError(`${path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`);
  }
  if (!storePathSchema.safeParse(real).success) throw new UsageError(`${path} resolves to ${real}, which is not a path directly under /nix/store`);
  return real;
}

async function valid(path: string): Promise<boolean> {
  const r = await run('nix-store', ['--check-validity', '--', path]);
  return r.exitCode === 0;
}

/** One `nix build` for every host (Nix builds them in parallel); the toplevels in the same order. */
async function buildHere(installables: string[]): Promise<string[]> {
  // Held by GC roots of this run until it ends: a garbage collection here must not take a path that
  // is still to be pushed.
  const roots = mkdtempSync(join(tmpdir(), 'snapback-build-'));
  process.once('exit', () => rmSync(roots, { recursive: true, force: true }));
  const r = await run('nix', [...FLAKES, 'build', '--json', '--out-link', join(roots, 'result'), '--', ...installables]);
  if (r.exitCode !== 0) {
    // The summary is Nix's first error line (the cause); the whole output rides along for --json.
    const said = String(r.stderr).split('\n').map((l) => l.replace(/\x1b\[[0-9;]*m/g, '')).filter((l) => l.trim());
    const why = said.find((l) => l.trim().startsWith('error:'))?.trim() ?? said.at(-1)?.trim() ?? `exit status ${r.exitCode}`;
    throw new SnapbackError('build-failed', `building here failed (nix build ${installables.join(' ')}): ${why}`, { output: said.join('\n') });
  }
  const built = JSON.parse(String(r.stdout)) as { outputs: { out: string } }[];
  // A toplevel that is a link (a flake whose output is a symlink) is pushed as what it points to.
  return built.map((b) => realpathSync(b.outputs.out));
}
