#!/usr/bin/env node
// The agent: `snapback-agent serve` (the daemon) and the console commands.
import { start } from './start.js';

// The daemon runs for years and mostly waits. V8 without its optimizing compilers, sized for a small
// heap with a small young generation, keeps it near a bare Node instead of twice one (README
// "Performance"). The flags must be on Node's command line, so `serve` replaces this process with
// Node started with them: process.execve keeps the PID, which systemd watches. SNAPBACK_V8=default
// keeps V8's defaults.
const DAEMON_FLAGS = ['--optimize-for-size', '--no-opt', '--no-maglev', '--max-semi-space-size=1'];
if (process.argv.slice(2).includes('serve') && !process.execArgv.includes('--no-opt') && typeof process.execve === 'function' && process.env.SNAPBACK_V8 !== 'default') {
  process.execve(process.execPath, [process.execPath, ...DAEMON_FLAGS, ...process.execArgv, ...process.argv.slice(1)]);
}
await start('snapback-agent', 'agent/cli');
