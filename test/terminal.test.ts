// Host text on the operator's terminal: nothing a host sends can act on the terminal.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { clean, oneLine, safeJson } from '../shared/terminal.ts';

const ESC = '\x1b';

describe('clean: host text without terminal controls', () => {
  it('keeps ordinary text, tabs as spaces, newlines', () => {
    assert.equal(clean('restarting sshd.service — ok ✓'), 'restarting sshd.service — ok ✓');
    assert.equal(clean('a\tb\nc'), 'a b\nc');
  });

  it('removes CSI sequences: colours, cursor movement, erase, scroll region', () => {
    assert.equal(clean(`${ESC}[1;31merror${ESC}[0m: x`), 'error: x');
    assert.equal(clean(`ok${ESC}[2F${ESC}[2Kforged line`), 'okforged line');
    assert.equal(clean(`${ESC}[?25l${ESC}[1;24r${ESC}[H${ESC}[Jx`), 'x');
  });

  it('removes OSC strings: clipboard (OSC 52), title, hyperlinks; ended by BEL, ST or nothing', () => {
    assert.equal(clean(`a${ESC}]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07b`), 'ab');
    assert.equal(clean(`a${ESC}]0;pwned${ESC}\\b`), 'ab');
    assert.equal(clean(`${ESC}]8;;http://evil/${ESC}\\link${ESC}]8;;${ESC}\\`), 'link');
    assert.equal(clean(`a${ESC}]52;c;unterminated`), 'a');
  });

  it('removes DCS, APC, PM, SOS strings and short escapes', () => {
    assert.equal(clean(`a${ESC}P+q544e${ESC}\\b`), 'ab');
    assert.equal(clean(`a${ESC}_apc${ESC}\\b${ESC}^pm\x07c`), 'abc');
    assert.equal(clean(`${ESC}7save${ESC}8${ESC}(0${ESC}c${ESC}Mx`), 'savex');
    assert.equal(clean(`lone ${ESC}`), 'lone ');
  });

  it('removes CR, BEL, backspace, DEL and the other C0 controls', () => {
    assert.equal(clean('progress 10%\rprogress 100%'), 'progress 10%progress 100%');
    assert.equal(clean('bell\x07 back\x08\x08 nul\x00 del\x7f vt\x0b ff\x0c so\x0e'), 'bell back nul del vt ff so');
  });

  it('removes C1 controls (8-bit CSI, OSC, ST, NEL) and bidi overrides', () => {
    assert.equal(clean('a\x9b2Jb\x9d52;c;x\x9cc\x85d'), 'a2Jb52;c;xcd');
    assert.equal(clean('admin\u202e\u2066txt.exe\u2069\u202c'), 'admintxt.exe');
    assert.equal(clean('x\u2028y'), 'xy');
  });

  it('oneLine: newlines become spaces', () => {
    assert.equal(oneLine(`first\nsecond${ESC}[A\r\n`), 'first second ');
  });

  it('safeJson: parses back to the same value, with no raw control character left', () => {
    const value = { line: `${ESC}]52;c;x\x07 \x9b2J \u202e \x7f ok` };
    const text = safeJson(value);
    assert.deepEqual(JSON.parse(text), value);
    assert.doesNotMatch(text, /[\x00-\x1f\x7f-\x9f\u202e]/);
  });
});
