// The bench measures what the Nix package ships: the compiled JavaScript (`tsc`, as nix/build.sh
// does), not the TypeScript sources the tests run. Imported first by bench/run.ts, it builds a copy
// in a temporary directory and points the test helpers' commands at it (SNAPBACK_BIN_DIR).

import { execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'snapback-bench-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
execFileSync(join(root, 'node_modules/.bin/tsc'), ['-p', join(root, 'tsconfig.build.json'), '--outDir', join(dir, 'dist')], { stdio: 'inherit' });
cpSync(join(root, 'bin'), join(dir, 'bin'), { recursive: true });
writeFileSync(join(dir, 'package.json'), JSON.stringify({ type: 'module' }));
symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
process.env.SNAPBACK_BIN_DIR = join(dir, 'bin');
