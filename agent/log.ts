// Logging: pino JSON lines on stdout (journald keeps them), short readable lines on a terminal.

import { pino, type Logger } from 'pino';

export type { Logger };

const LEVELS: Record<number, string> = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR', 60: 'FATAL' };

/** Formats a pino JSON line as `12:04:05 WARN  message key=value`. */
function readable(line: string): string {
  try {
    const { level, time, msg, pid: _p, hostname: _h, ...rest } = JSON.parse(line) as Record<string, unknown>;
    const t = new Date(Number(time)).toTimeString().slice(0, 8);
    const extra = Object.entries(rest)
      .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
      .join(' ');
    return `${t} ${(LEVELS[Number(level)] ?? String(level)).padEnd(5)} ${String(msg ?? '')}${extra ? `  ${extra}` : ''}\n`;
  } catch {
    return line;
  }
}

/** `fd` 1 for the daemon (journald reads stdout); 2 for a one-shot command whose stdout is its answer. */
export function createLogger(level: string, fd: 1 | 2 = 1): Logger {
  const options = { level, base: { pid: process.pid }, timestamp: pino.stdTimeFunctions.epochTime };
  const stream = fd === 1 ? process.stdout : process.stderr;
  if (!stream.isTTY) return pino(options, pino.destination({ dest: fd, sync: true }));
  return pino(options, { write: (line: string) => void stream.write(readable(line)) });
}
