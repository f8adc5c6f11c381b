#!/usr/bin/env node
// The agent: `snapback-agent serve` (the daemon) and the console commands.
import { start } from './start.js';

// The daemon runs for years and mostly waits. V8 without its optimizing compilers (their code and
// their working memory) and with a young generation of at most 1 MiB keeps it under 1.5x a bare
// Node instead of 2x; a push costs it 10-20% more CPU (README "Performance", measured). The flags
// must be on Node's command line, so `serve` replaces this process with Node started with them:
// process.execve keeps the PID, which systemd watches. SNAPBACK_V8=default keeps V8's defaults.
const DAEMON_FLAGS = ['--no-opt', '--no-maglev', '--max-semi-space-size=1'];
// The command is the first positional argument ("serve" may also be the value of an option: the
// options that take one are those of agent/cli.ts OPTIONS).
const VALUED = new Set(['--config', '--flake', '--generation', '--timeout', '--id', '--limit']);
const command = process.argv.slice(2).find((a, i, all) => !a.startsWith('-') && !(i > 0 && VALUED.has(all[i - 1])));
if (command === 'serve' && !DAEMON_FLAGS.every((f) => process.execArgv.includes(f)) && typeof process.execve === 'function' && process.env.SNAPBACK_V8 !== 'default') {
  process.execve(process.execPath, [process.execPath, ...DAEMON_FLAGS, ...process.execArgv, ...process.argv.slice(1)]);
}
// The daemon starts once and would hold the compile cache's contents in memory for its whole life
// (about 1 MiB, measured); the console commands, each a new process, start sooner with it.
await start('snapback-agent', 'agent/cli', { compileCache: command !== 'serve' });
