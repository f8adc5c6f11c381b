// Text from a host (build and switch output, error texts, anything the agent says) reaches the
// operator's terminal only through these: no host can move the cursor, rewrite lines, retitle the
// window or set the clipboard (OSC 52).

// ESC-introduced sequences: CSI (ESC [ … final), OSC / DCS / SOS / PM / APC strings (ended by BEL or
// ST, or cut off at the end of the text), and the two- and three-byte escapes (ESC ( B, ESC 7, …).
// The 8-bit forms (U+009B CSI, U+009D OSC, …) are C1 controls, removed one by one below, their
// parameters then left as harmless printable text.
const ESCAPES = new RegExp(
  [
    '\\x1b\\[[\\x30-\\x3f]*[\\x20-\\x2f]*[\\x40-\\x7e]?', // CSI
    '\\x1b[\\]PX^_][\\s\\S]*?(?:\\x07|\\x1b\\\\|\\x9c|$)', // OSC, DCS, SOS, PM, APC … up to BEL or ST
    '\\x1b[\\x20-\\x2f]*[\\x30-\\x7e]?', // nF / Fp / Fe / Fs escapes, or a lone ESC
  ].join('|'),
  'g',
);

// C0 controls (NUL…US except TAB and LF), DEL, C1 controls, and the Unicode controls that reorder or
// break what is shown: bidi embeddings, overrides and isolates ("Trojan Source"), line and paragraph
// separators.
const CONTROLS = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** `s` without terminal control sequences or characters; tabs become spaces, newlines stay. */
export function clean(s: string): string {
  return s.replace(ESCAPES, '').replace(/\t/g, ' ').replace(CONTROLS, '');
}

/** `clean`, on one line: a newline becomes a space (a live view counts its lines). */
export function oneLine(s: string): string {
  return clean(s).replace(/\n+/g, ' ');
}

/**
 * JSON text with every character a terminal might act on escaped: JSON.stringify already escapes
 * C0, but leaves DEL, C1 and the bidi controls raw. The value parses back to the same string.
 */
export function safeJson(value: unknown): string {
  return JSON.stringify(value).replace(/[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}
