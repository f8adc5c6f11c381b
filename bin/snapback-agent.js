#!/usr/bin/env node
// The agent: `snapback-agent serve` (the daemon) and the console commands.
import { start } from './start.js';
await start('snapback-agent', 'agent/cli');
