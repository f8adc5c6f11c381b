#!/usr/bin/env node
// The controller: `snapback deploy`, `status`, `confirm`, `rollback`, `history`.
import { start } from './start.js';
await start('snapback', 'controller/cli');
