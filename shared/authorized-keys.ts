// The agent's `authorizedKeys` read as sshd reads authorized_keys lines, options included, and the
// decision whether a key may act from a given address at a given time.

import { isIP } from 'node:net';
import { matchWildcard, parsePublicKeyLine, type PublicKey } from './ssh.ts';

export interface AuthorizedKey {
  key: PublicKey;
  /** 1-based index in `authorizedKeys`, for messages */
  line: number;
  /** `from="…"` patterns: the key is accepted only from a matching address */
  from?: string[];
  /** `expiry-time="…"`, ms since the epoch: the key is refused from then on */
  expiresAt?: number;
}

export type Authorization = { ok: true; entry: AuthorizedKey } | { ok: false; reason: 'unknown-key' | 'from' | 'expired'; message: string };

/**
 * Options that give a key less than full rights in a way Snapback cannot enforce: a line carrying one
 * is skipped, never promoted to an operator. (`restrict` alone takes away nothing Snapback has, but
 * it says "this key is meant to be limited", usually beside `command=`.)
 */
const REFUSED: Record<string, string> = {
  command: 'limits the key to one command',
  restrict: 'marks the key as restricted',
  principals: 'names certificate principals (Snapback does not accept certificates)',
  'cert-authority': 'makes it a certificate authority, not a key (Snapback does not accept certificates)',
};

/**
 * Options that only limit SSH features Snapback does not have — a pty, forwarding, ~/.ssh/rc, the
 * session's environment, tunnels, FIDO touch (only plain ssh-ed25519 keys are accepted): they are
 * accepted and change nothing. The value says whether the option takes `="…"`.
 */
const IGNORED: Record<string, boolean> = {
  pty: false,
  'no-pty': false,
  'port-forwarding': false,
  'no-port-forwarding': false,
  'agent-forwarding': false,
  'no-agent-forwarding': false,
  'x11-forwarding': false,
  'no-x11-forwarding': false,
  'user-rc': false,
  'no-user-rc': false,
  'touch-required': false,
  'no-touch-required': false,
  'verify-required': false,
  environment: true,
  permitopen: true,
  permitlisten: true,
  tunnel: true,
};

/**
 * Parses `authorizedKeys` (one authorized_keys line each). A line that cannot be honoured exactly —
 * not an ssh-ed25519 key, a malformed or unknown option, one of REFUSED — is skipped with a warning
 * naming its line number and why: a key is never given more rights than its line says.
 */
export function parseAuthorizedKeys(lines: string[], warn: (msg: string) => void): AuthorizedKey[] {
  const out: AuthorizedKey[] = [];
  lines.forEach((text, i) => {
    const line = i + 1;
    const t = text.trim();
    if (!t || t.startsWith('#')) return;
    try {
      out.push(parseLine(t, line, warn));
    } catch (err) {
      warn(`authorizedKeys line ${line}: skipped: ${(err as Error).message}`);
    }
  });
  return out;
}

function parseLine(text: string, line: number, warn: (msg: string) => void): AuthorizedKey {
  // As sshd: a line either starts with the key type, or with an options field that ends at the
  // first blank outside double quotes (a quoted value may hold blanks, commas and \").
  let rest = text;
  let options: { name: string; value?: string }[] = [];
  if (!/^(ssh-|ecdsa-|sk-)/.test(text)) {
    let quoted = false;
    let end = 0;
    for (; end < text.length && (quoted || !/\s/.test(text[end]!)); end++) {
      if (text[end] === '\\' && text[end + 1] === '"') end++;
      else if (text[end] === '"') quoted = !quoted;
    }
    if (quoted) throw new Error('an option value has no closing double quote');
    options = parseOptions(text.slice(0, end));
    rest = text.slice(end).trim();
    if (!/^(ssh-|ecdsa-|sk-)/.test(rest)) throw new Error(`no key after the options (expected "ssh-ed25519 AAAA…", found "${rest.slice(0, 30)}")`);
  }
  const entry: AuthorizedKey = { key: parsePublicKeyLine(rest), line };
  const seen = new Set<string>();
  for (const { name, value } of options) {
    const refused = REFUSED[name];
    if (refused) throw new Error(`option ${name} ${refused}; Snapback cannot honour it, so this key gets no rights at all (give the operator a line without it)`);
    if (name === 'from' || name === 'expiry-time') {
      if (value === undefined) throw new Error(`option ${name} needs a value: ${name}="…"`);
      if (seen.has(name)) throw new Error(`option ${name} appears twice`);
      seen.add(name);
      if (name === 'from') entry.from = parseFrom(value, line, warn);
      else entry.expiresAt = parseExpiry(value);
      continue;
    }
    const takesValue = IGNORED[name];
    if (takesValue === undefined) throw new Error(`unknown option ${name}`);
    if (takesValue !== (value !== undefined)) throw new Error(takesValue ? `option ${name} needs a value: ${name}="…"` : `option ${name} takes no value`);
  }
  return entry;
}

/** The options field: `name` or `name="value"`, comma-separated; in a value, \" is a quote. */
function parseOptions(field: string): { name: string; value?: string }[] {
  const out: { name: string; value?: string }[] = [];
  let i = 0;
  for (;;) {
    const name = /^[a-z0-9-]+/i.exec(field.slice(i))?.[0];
    if (!name) throw new Error(`cannot read an option at "${field.slice(i, i + 30)}"`);
    i += name.length;
    let value: string | undefined;
    if (field[i] === '=') {
      if (field[++i] !== '"') throw new Error(`the value of option ${name} must be in double quotes`);
      value = '';
      for (i++; i < field.length && field[i] !== '"'; i++) {
        if (field[i] === '\\' && field[i + 1] === '"') i++;
        value += field[i];
      }
      if (i >= field.length) throw new Error(`the value of option ${name} has no closing double quote`);
      i++;
    }
    // sshd compares option names without regard to case (no-X11-forwarding)
    out.push({ name: name.toLowerCase(), ...(value === undefined ? {} : { value }) });
    if (i === field.length) return out;
    if (field[i] !== ',') throw new Error(`expected "," after option ${name}, found "${field.slice(i, i + 20)}"`);
    i++;
  }
}

// ---- from="pattern-list" ------------------------------------------------------------------------------

/**
 * Checks the patterns once, at load: CIDR blocks must be exact (sshd refuses `10.0.0.1/8`), and a host
 * name can never match, because the agent does not resolve the peer's name (sshd's UseDNS=no).
 */
function parseFrom(value: string, line: number, warn: (msg: string) => void): string[] {
  const patterns = value.split(',').map((p) => p.trim());
  const names: string[] = [];
  for (const p of patterns) {
    const bare = p.startsWith('!') ? p.slice(1) : p;
    if (!bare) throw new Error(`from="${value}" has an empty pattern`);
    if (bare.includes('/')) {
      if (!cidr(bare)) throw new Error(`from= pattern "${bare}" is not a network address/prefix length (like 10.0.0.0/8 or fd00::/8)`);
    } else if (/[^0-9a-f:.*?]/i.test(bare) || (/[a-f]/i.test(bare) && !bare.includes(':'))) {
      names.push(bare);
    }
  }
  if (names.length) {
    warn(`authorizedKeys line ${line}: from= pattern ${names.map((n) => `"${n}"`).join(', ')} is a host name; the agent does not resolve names, so it never matches (use addresses or CIDR blocks)`);
  }
  return patterns;
}

/**
 * sshd's rule: the address must match some pattern and no `!pattern`. A pattern is a CIDR block or a
 * `*`/`?` wildcard over the address as text; an IPv4-mapped IPv6 peer counts as its IPv4 address.
 */
export function fromMatches(patterns: string[], peerAddress: string): boolean {
  const peer = normalize(peerAddress);
  let hit = false;
  for (const p of patterns) {
    const negated = p.startsWith('!');
    const bare = negated ? p.slice(1) : p;
    // As sshd's addr_match_list: a pattern that is an address (any spelling of it) is compared as
    // a number, a /32 or /128 block; only what is not an address is a wildcard over the text.
    const address = bare.includes('/') ? undefined : normalize(bare).ip;
    const net = bare.includes('/') ? cidr(bare) : undefined;
    const matches = address
      ? !!peer.ip && peer.ip.family === address.family && peer.ip.bits === address.bits
      : net
        ? !!peer.ip && peer.ip.family === net.family && peer.ip.bits >> net.hostBits === net.bits >> net.hostBits
        : matchWildcard(peer.text, bare);
    if (matches && negated) return false;
    if (matches) hit = true;
  }
  return hit;
}

interface Ip {
  family: 4 | 6;
  bits: bigint;
}

function normalize(address: string): { text: string; ip?: Ip } {
  const text = address.replace(/%.*$/, '').toLowerCase();
  const ip = ipBits(text);
  if (ip?.family === 6 && ip.bits >> 32n === 0xffffn) {
    const v4 = ip.bits & 0xffffffffn;
    return { text: [24n, 16n, 8n, 0n].map((s) => String((v4 >> s) & 0xffn)).join('.'), ip: { family: 4, bits: v4 } };
  }
  return ip ? { text, ip } : { text };
}

function ipBits(address: string): Ip | undefined {
  const family = isIP(address);
  const v4 = (a: string) => a.split('.').reduce((n, octet) => (n << 8n) | BigInt(octet), 0n);
  if (family === 4) return { family, bits: v4(address) };
  if (family !== 6) return undefined;
  // isIP has vouched for the form: at most one "::", an IPv4 tail only at the end.
  const groups = (s: string) =>
    s ? s.split(':').flatMap((g) => (g.includes('.') ? [(v4(g) >> 16n).toString(16), (v4(g) & 0xffffn).toString(16)] : [g])) : [];
  const [head = '', tail] = address.split('::');
  const h = groups(head);
  const t = tail === undefined ? [] : groups(tail);
  const all = tail === undefined ? h : [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t];
  return { family, bits: all.reduce((n, g) => (n << 16n) | BigInt(parseInt(g, 16)), 0n) };
}

function cidr(pattern: string): (Ip & { hostBits: bigint }) | undefined {
  const m = /^([^/]+)\/(\d{1,3})$/.exec(pattern);
  const ip = m && ipBits(m[1]!.toLowerCase());
  if (!m || !ip) return undefined;
  const width = ip.family === 4 ? 32 : 128;
  const prefix = Number(m[2]);
  if (prefix > width) return undefined;
  const hostBits = BigInt(width - prefix);
  if (ip.bits & ((1n << hostBits) - 1n)) return undefined;
  return { ...ip, hostBits };
}

// ---- expiry-time="YYYYMMDD[HHMM[SS]]" --------------------------------------------------------------------

/** In local time, as sshd reads it, unless it ends in `Z` (or `UTC`). */
function parseExpiry(value: string): number {
  const m = /^(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?(Z|UTC)?$/i.exec(value);
  if (!m) throw new Error(`expiry-time="${value}" is not YYYYMMDD[HHMM[SS]][Z]`);
  const [y, mo, d, h, mi, s] = m.slice(1, 7).map((x) => Number(x ?? 0)) as [number, number, number, number, number, number];
  const day = new Date(Date.UTC(y, mo - 1, d));
  if (day.getUTCMonth() !== mo - 1 || day.getUTCDate() !== d || h > 23 || mi > 59 || s > 59) throw new Error(`expiry-time="${value}" is not a valid date and time`);
  return m[7] ? Date.UTC(y, mo - 1, d, h, mi, s) : new Date(y, mo - 1, d, h, mi, s).getTime();
}

// ---- the decision --------------------------------------------------------------------------------------

/**
 * Whether `key`, connecting from `peerAddress` at `nowMs`, is an operator. Like sshd, every line
 * listing the key is tried, and one whose conditions hold is enough. Time is checked here, not at
 * load: the agent runs for years.
 */
export function authorize(entries: AuthorizedKey[], key: PublicKey, peerAddress: string, nowMs: number): Authorization {
  const refusals: { reason: 'from' | 'expired'; message: string }[] = [];
  for (const entry of entries) {
    if (!entry.key.blob.equals(key.blob)) continue;
    if (entry.expiresAt !== undefined && nowMs >= entry.expiresAt) {
      refusals.push({ reason: 'expired', message: `authorizedKeys line ${entry.line}: the key expired at ${new Date(entry.expiresAt).toISOString()} (expiry-time)` });
    } else if (entry.from && !fromMatches(entry.from, peerAddress)) {
      refusals.push({ reason: 'from', message: `authorizedKeys line ${entry.line}: ${peerAddress} does not match from="${entry.from.join(',')}"` });
    } else {
      return { ok: true, entry };
    }
  }
  if (!refusals.length) return { ok: false, reason: 'unknown-key', message: `${key.fingerprint} is not in authorizedKeys` };
  return { ok: false, reason: refusals[0]!.reason, message: refusals.map((r) => r.message).join('; ') };
}
