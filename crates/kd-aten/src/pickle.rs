//! A rewrite of `torch.save`'s pickle program so libtorch's unpickler can
//! read state dicts. `model.state_dict()` is a `collections.OrderedDict`,
//! which libtorch's unpickler turns into None (it expects that class only
//! as a tensor's empty backward hooks), so filling it fails. Here every
//! `OrderedDict()` becomes an empty dict (`}`), and the `BUILD` that would
//! set its `_metadata` attribute goes, with the bytes that built that state
//! (libtorch's unpickler has no POP to drop it with).
//!
//! The program is followed opcode by opcode with a model of the stack that
//! knows only which slots are the OrderedDict class, an empty tuple, or a
//! rewritten dict. Anything it does not understand leaves the program as
//! it was, for libtorch to accept or refuse.

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Mark,
    Other,
    /// The class, pushed by the output bytes from this offset on.
    OdClass(usize),
    EmptyTuple,
    OdDict,
}

/// Argument bytes of an opcode after its code, or `None` for the ones
/// read up to a newline (`lines` of them).
enum Arg {
    Fixed(usize),
    Len(usize),
    Lines(usize),
}

fn arg_of(op: u8) -> Option<Arg> {
    use Arg::*;
    Some(match op {
        b'(' | b'.' | b'0' | b'1' | b'2' | b'N' | b'R' | b'a' | b'b' | b'd' | b'}' | b'e'
        | b'l' | b']' | b'o' | b's' | b't' | b')' | b'u' | b'Q' | 0x81 | 0x85 | 0x86 | 0x87
        | 0x88 | 0x89 | 0x8f | 0x90 | 0x91 | 0x92 | 0x93 | 0x94 | 0x97 | 0x98 => Fixed(0),
        b'K' | b'h' | b'q' | 0x80 | 0x82 => Fixed(1),
        b'M' | 0x83 => Fixed(2),
        b'J' | b'j' | b'r' | 0x84 => Fixed(4),
        b'G' | 0x95 => Fixed(8),
        b'U' | 0x8c | b'C' | 0x8a => Len(1),
        b'T' | b'X' | b'B' | 0x8b => Len(4),
        0x8d | 0x8e | 0x96 => Len(8),
        b'I' | b'L' | b'S' | b'V' | b'F' | b'g' | b'p' | b'P' => Lines(1),
        b'c' | b'i' => Lines(2),
        _ => return None,
    })
}

fn le(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .rev()
        .fold(0usize, |acc, &b| acc.wrapping_shl(8) | b as usize)
}

/// Drops the memo entries whose put was at or after output offset `cut`,
/// which the caller just truncated away; the OrderedDict class stays, as
/// every later fetch of it is rewritten too.
fn forget(memo: &mut HashMap<usize, Slot>, put_at: &mut HashMap<usize, usize>, cut: usize) {
    put_at.retain(|key, at| {
        let keep = *at < cut || matches!(memo.get(key), Some(Slot::OdClass(_)));
        if !keep {
            memo.remove(key);
        }
        keep
    });
}

/// The program with every OrderedDict made a plain dict, or `None` when it
/// holds none or an opcode this model does not follow.
pub fn plain_dicts(pkl: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(pkl.len());
    // Each slot with the output offset its bytes start at.
    let mut stack: Vec<(Slot, usize)> = Vec::new();
    let mut memo: HashMap<usize, Slot> = HashMap::new();
    // Where each memo entry was put, to know which a truncation removed.
    let mut put_at: HashMap<usize, usize> = HashMap::new();
    let mut changed = false;
    let mut at = 0;
    // Pops to the mark; the start of the mark (where the group began).
    let pop_mark = |stack: &mut Vec<(Slot, usize)>| -> Option<usize> {
        let m = stack.iter().rposition(|s| s.0 == Slot::Mark)?;
        let start = stack[m].1;
        stack.truncate(m);
        Some(start)
    };
    let pop_n = |stack: &mut Vec<(Slot, usize)>, n: usize| -> Option<usize> {
        let from = stack.len().checked_sub(n)?;
        let start = stack.get(from).map(|s| s.1);
        stack.truncate(from);
        start
    };
    while at < pkl.len() {
        let op = pkl[at];
        let start = at;
        at += 1;
        let arg = match arg_of(op)? {
            Arg::Fixed(n) => n,
            Arg::Len(n) => n + le(pkl.get(at..at + n)?),
            Arg::Lines(k) => {
                let mut end = at;
                for _ in 0..k {
                    end += pkl.get(end..)?.iter().position(|&b| b == b'\n')? + 1;
                }
                end - at
            }
        };
        let body = pkl.get(at..at + arg)?;
        at += arg;
        let here = out.len();
        let mut emit = true;
        let number = |b: &[u8]| -> Option<usize> {
            std::str::from_utf8(b.strip_suffix(b"\n")?)
                .ok()?
                .parse()
                .ok()
        };
        match op {
            // Frames only hint at lengths, which the rewrite changes.
            0x95 => emit = false,
            b'(' => stack.push((Slot::Mark, here)),
            b'c' => {
                let od = body == b"collections\nOrderedDict\n";
                stack.push((if od { Slot::OdClass(here) } else { Slot::Other }, here));
            }
            b')' => stack.push((Slot::EmptyTuple, here)),
            b'h' | b'j' | b'g' => {
                let key = if op == b'g' { number(body)? } else { le(body) };
                // A memo entry cut out with the bytes that made it is gone
                // (`forget` below): no rewrite then.
                let slot = match *memo.get(&key)? {
                    Slot::OdClass(_) => Slot::OdClass(here),
                    s => s,
                };
                stack.push((slot, here));
            }
            b'q' | b'r' | b'p' | 0x94 => {
                let key = match op {
                    b'p' => number(body)?,
                    0x94 => memo.len(),
                    _ => le(body),
                };
                memo.insert(key, stack.last()?.0);
                put_at.insert(key, here);
            }
            b'R' => {
                let (args, _) = stack.pop()?;
                let (callable, from) = stack.pop()?;
                match (callable, args) {
                    (Slot::OdClass(from), Slot::EmptyTuple) => {
                        // The class (and its memo put) and `()` go; an
                        // empty dict takes their place.
                        out.truncate(from);
                        forget(&mut memo, &mut put_at, from);
                        out.push(b'}');
                        emit = false;
                        changed = true;
                        stack.push((Slot::OdDict, from));
                    }
                    (Slot::OdClass(_), _) => return None,
                    _ => stack.push((Slot::Other, from)),
                }
            }
            b'b' => {
                let (_, state_at) = stack.pop()?;
                if stack.last()?.0 == Slot::OdDict {
                    // `_metadata` of a state_dict: not weights.
                    out.truncate(state_at);
                    forget(&mut memo, &mut put_at, state_at);
                    emit = false;
                }
            }
            b'.' => {
                out.push(op);
                return changed.then_some(out);
            }
            b'0' => {
                stack.pop()?;
            }
            b'1' | b'e' | b'u' | 0x90 => {
                pop_mark(&mut stack)?;
            }
            b'2' => stack.push((stack.last()?.0, here)),
            b't' | b'l' | b'd' | 0x91 | b'o' | b'i' => {
                let from = pop_mark(&mut stack)?;
                stack.push((Slot::Other, from));
            }
            b'a' => {
                stack.pop()?;
            }
            b's' => {
                pop_n(&mut stack, 2)?;
            }
            0x85 | 0x86 | 0x87 | 0x81 | 0x92 | 0x93 | b'Q' => {
                let n = match op {
                    0x85 | b'Q' => 1,
                    0x86 | 0x81 | 0x93 => 2,
                    _ => 3,
                };
                let from = pop_n(&mut stack, n)?;
                stack.push((Slot::Other, from));
            }
            // Protocol and buffer markers change no slot.
            0x80 | 0x98 => {}
            _ => stack.push((Slot::Other, here)),
        }
        if emit {
            out.extend_from_slice(&pkl[start..at]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordered_dict_with_metadata_becomes_a_dict_without_it() {
        // protocol 2: OrderedDict() memoised, one item, then BUILD with
        // {'_metadata': OrderedDict()} (the class fetched from the memo).
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01");
        p.extend(b"X\x01\x00\x00\x00aK\x07s");
        p.extend(b"}q\x02X\x09\x00\x00\x00_metadatah\x00)Rs");
        p.extend(b"b.");
        let out = plain_dicts(&p).expect("rewritten");
        let mut want = vec![0x80, 2];
        want.extend(b"}q\x01X\x01\x00\x00\x00aK\x07s.");
        assert_eq!(out, want);
    }

    #[test]
    fn a_memoised_class_serves_every_ordered_dict_and_cut_entries_stay_cut() {
        // Two OrderedDicts from one memoised class, inside a list.
        let mut p = vec![0x80, 2];
        p.extend(b"](ccollections\nOrderedDict\nq\x00)Rq\x01h\x00)Rq\x02e.");
        let mut want = vec![0x80, 2];
        want.extend(b"](}q\x01}q\x02e.");
        assert_eq!(plain_dicts(&p), Some(want));
        // The metadata state memoises a dict that a later fetch reads: it
        // went with the BUILD, so the program is left to libtorch.
        let mut p = vec![0x80, 2];
        p.extend(b"](ccollections\nOrderedDict\nq\x00)R}q\x01bh\x01e.");
        assert_eq!(plain_dicts(&p), None);
    }

    #[test]
    fn programs_without_ordered_dicts_are_left_alone() {
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x07s.";
        assert_eq!(plain_dicts(p), None);
        // Truncated or unknown opcodes: no rewrite either.
        assert_eq!(plain_dicts(b"\x80\x02ccollections\nOrderedDict\n"), None);
        assert_eq!(plain_dicts(b"\xff"), None);
    }
}
