// Starts a command: the compiled JavaScript when built (`npm run build`, the Nix package), else
// the TypeScript sources, which Node runs directly from 22.18 on. An older Node gets a sentence
// saying what to do, not a stack trace. Plain JavaScript that any Node can parse.
import { existsSync } from 'node:fs';
import nodeModule from 'node:module';
import { join } from 'node:path';

/** `name`: the command; `module`: its path under dist/ and the source tree, without extension. */
export async function start(name, module) {
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
  enableCompileCache();
  const { main } = await import(compiled ? built.href : new URL(`../${module}.ts`, import.meta.url).href);
  process.exit(await main(process.argv.slice(2)));
}

/**
 * V8's compiled code of our modules, kept between runs (Node 22.1+): every command starts about
 * 50 ms sooner. In the user's own cache directory, never a shared one such as /tmp, where another
 * user could plant code that a root command would run. Without a home, nothing is cached.
 */
function enableCompileCache() {
  const home = process.env.XDG_CACHE_HOME || (process.env.HOME ? join(process.env.HOME, '.cache') : undefined);
  if (!home || typeof nodeModule.enableCompileCache !== 'function' || process.env.NODE_DISABLE_COMPILE_CACHE) return;
  try {
    nodeModule.enableCompileCache(join(home, 'snapback', 'node-compile-cache'));
  } catch {}
}
