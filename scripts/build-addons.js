// postinstall: (re)builds the optional sd-notify addon against the Node that runs the project
// (Node 24 from the `node` package), not the system Node npm itself runs on. A failure only
// means the agent falls back to spawning systemd-notify; it never fails the install.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { realpathSync } from 'node:fs';

const root = join(dirname(new URL(import.meta.url).pathname), '..');
if (!existsSync(join(root, 'node_modules', 'sd-notify'))) process.exit(0);
// The `node` package keeps the binary and its headers in node-<platform>-<arch> beside it.
const candidates = [
  dirname(dirname(realpathSync(process.execPath))),
  join(root, 'node_modules', 'node', 'node_modules', `node-${process.platform}-${process.arch}`),
];
const nodedir = candidates.find((d) => existsSync(join(d, 'include', 'node', 'node.h'))) ?? candidates[0];
if (!existsSync(join(nodedir, 'include', 'node', 'node.h'))) {
  console.warn(`sd-notify: no Node headers under ${nodedir}; the agent will use systemd-notify instead`);
  process.exit(0);
}
try {
  execFileSync('npm', ['rebuild', 'sd-notify', `--nodedir=${nodedir}`, '--ignore-scripts=false'], { cwd: root, stdio: 'pipe' });
  execFileSync(process.execPath, ['-e', "require('sd-notify')"], { cwd: root, stdio: 'pipe' });
  console.log(`sd-notify: built for Node ${process.version}`);
} catch (err) {
  console.warn(`sd-notify: could not build (needs libsystemd-dev, python3, make, g++); the agent will use systemd-notify instead`);
}
