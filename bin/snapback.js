#!/usr/bin/env node
// Runs the compiled controller when built (`npm run build`), else the TypeScript sources (Node >= 22.18).
import { existsSync } from 'node:fs';
const built = new URL('../dist/controller/cli.js', import.meta.url);
const { main } = await import(existsSync(built) ? built.href : new URL('../controller/cli.ts', import.meta.url).href);
process.exit(await main(process.argv.slice(2)));
