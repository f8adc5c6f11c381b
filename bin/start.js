// Starts a command: the compiled JavaScript when built (`npm run build`, the Nix package), else
// the TypeScript sources, which Node runs directly from 22.18 on. An older Node gets a sentence
// saying what to do, not a stack trace. Plain JavaScript that any Node can parse.
import { existsSync, lstatSync } from 'node:fs';
import nodeModule from 'node:module';
import { join } from 'node:path';

/**
 * `name`: the command; `module`: its path under dist/ and the source tree, without extension;
 * `compileCache`: whether V8's compiled code is kept between runs (below).
 */
export async function start(name, module, { compileCache = true } = {}) {
  const built = new URL(`../dist/${module}.js`, import.meta.url);
  const compiled = existsSync(built);
  const [major, minor] = process.versions.node.split('.').map(Number);
  const needed = compiled ? [22, 0] : [22, 18];
  if (major < needed[0] || (major === needed[0] && minor < needed[1])) {
    const here = new URL('..', import.meta.url).pathname;
    process.stderr.write(
      `${name}: Node.js ${needed.join('.')} or newer is needed ${compiled ? '' : 'to run from source '}(this is ${process.version} at ${process.execPath}).\n` +
        `  - in a checkout: npm ci installs Node 24 at ${here}node_modules/.bin/node; run "npm run ${name === 'snapback' ? 'snapback' : 'agent'} -- ARGS" or that node directly,\n` +
        (compiled ? '' : `  - or compile once with "npm run build" (then Node 22 is enough),\n`) +
        `  - or install a newer Node.js (NixOS: the flake's package brings its own).\n`,
    );
    process.exit(2);
  }
  if (compileCache) enableCompileCache();
  const { main } = await import(compiled ? built.href : new URL(`../${module}.ts`, import.meta.url).href);
  process.exit(await main(process.argv.slice(2)));
}

/**
 * V8's compiled code of our modules, kept between runs (Node 22.1+): every command starts about
 * 50 ms sooner. In the user's own cache directory, never a shared one such as /tmp, where another
 * user could plant code that a root command would run. Without a home, nothing is cached.
 */
function enableCompileCache() {
  const base = process.env.XDG_CACHE_HOME || process.env.HOME;
  if (!base || typeof nodeModule.enableCompileCache !== 'function' || process.env.NODE_DISABLE_COMPILE_CACHE) return;
  const parts = process.env.XDG_CACHE_HOME ? ['snapback', 'node-compile-cache'] : ['.cache', 'snapback', 'node-compile-cache'];
  // Only in a directory of our own: under `sudo -E` or `su` root may have another user's HOME,
  // whose owner could put code there that root would run.
  if (!ownedByMe(base, parts)) return;
  try {
    nodeModule.enableCompileCache(join(base, ...parts));
  } catch {}
}

/** `base` and each of `parts` below it that exists: owned by this user, writable by nobody else. */
function ownedByMe(base, parts) {
  if (typeof process.getuid !== 'function') return true;
  const uid = process.getuid();
  let dir = base;
  for (const part of ['', ...parts]) {
    dir = part ? join(dir, part) : dir;
    let st;
    try {
      st = lstatSync(dir);
    } catch {
      return true; // what does not exist yet is made by us
    }
    if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o022) !== 0) return false;
  }
  return true;
}
