//! Free text stored in an order: what a reader accepts, what a writer may write, and the guard
//! against full card numbers.
//!
//! The free-text fields are a line's `sku`, `name`, `note` and `modifiers`, a payment's `kind`
//! and `reference`, a transition's `reference` and an acknowledgement's `note` ([`TextField`]).
//! Two rules, kept in this one module so they cannot drift apart:
//!
//! * **What a reader accepts** ([`check_readable`]). The schema parser applies it, so a
//!   document is an order only if its free text has this shape. Only payment kind names are
//!   restricted ([`check_kind_name`]); every other field reads as any string. The reader never
//!   refuses a card number: a document that already holds one must stay readable (and
//!   repairable), or the order would be stuck.
//! * **What a writer may write** ([`check_free_text`]). The typed API applies it before writing
//!   anything, and the relay's policy applies it to every free-text value a change writes
//!   ([`check_text_at`]). It checks, in this order: a length limit ([`TextField::max_bytes`]),
//!   the card-number guard ([`find_card_number`]), then the reader's rule. A value that passes
//!   is therefore always readable.
//!
//! # Card numbers
//!
//! A payment card number (PAN) has 13 to 19 digits and passes the Luhn check. Free text is
//! scanned for one as follows:
//!
//! * **digits** are the ASCII digits, every other Unicode decimal digit (category `Nd`: the
//!   full-width `４`, Arabic-Indic, Devanagari, mathematical digits, ...) and the superscript and
//!   subscript digits;
//! * **separators** are any Unicode whitespace, dots and dashes (with their full-width and
//!   typographic forms) and invisible formatting characters (zero-width space, soft hyphen,
//!   direction marks). Any number of separators between two digits keeps them in one **run**;
//! * anything else (a letter, `*`, `/`, `:`, `,`, ...) ends a run;
//! * in each run, **every** window of 13 to 19 consecutive digits is tested: a Luhn-valid window
//!   is a card number. So a number is found wherever it sits in a run, e.g. after an
//!   authorisation code (`123456 4111111111111111`).
//!
//! Masked numbers pass because the mask ends the run: `**** **** **** 1111`, `411111******1111`,
//! `XXXX-1111`. So do short numbers next to each other as long as the run stays below 13
//! digits (`AUTH 123456`, `table 12`).
//!
//! The price of testing every window: a run of 13 or more digits is refused with probability
//! about 1/10 per window (random digits pass Luhn one time in ten), so a run of 16 or more
//! digits is refused almost always. Long digit strings (two phone numbers separated only by
//! spaces, a cheque's CMC-7 line, a full gift card number) must be stored with a non-separator
//! between the groups, or masked. One exception keeps barcodes sellable: a `sku` that is exactly
//! a 13- or 14-digit GTIN (EAN-13, GTIN-14) with a valid GS1 check digit is accepted.

use std::ops::{Range, RangeInclusive};

use crate::error::{ModelError, PolicyViolation};
use crate::order::MAX_TEXT;
use crate::payment::MAX_REFERENCE_LEN;
use crate::schema::keys;

/// Longest payment kind name, in characters.
pub const MAX_KIND_CHARS: usize = 32;

/// Shortest and longest card number, in digits.
pub const CARD_DIGITS: RangeInclusive<usize> = 13..=19;

/// A free-text field of the order document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TextField {
    /// `lines.<id>.sku`.
    Sku,
    /// `lines.<id>.name`.
    LineName,
    /// An element of `lines.<id>.modifiers`.
    Modifier,
    /// `lines.<id>.note`.
    LineNote,
    /// `payments.<id>.kind`: a tender's name.
    PaymentKind,
    /// `payments.<id>.reference`.
    PaymentReference,
    /// `payments.<id>.transitions.<id>.reference`.
    TransitionReference,
    /// `acks.<id>.note`.
    AckNote,
}

impl TextField {
    /// Every free-text field.
    pub const ALL: [Self; 8] = [
        Self::Sku,
        Self::LineName,
        Self::Modifier,
        Self::LineNote,
        Self::PaymentKind,
        Self::PaymentReference,
        Self::TransitionReference,
        Self::AckNote,
    ];

    /// The field's name in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sku => "sku",
            Self::LineName => "name",
            Self::Modifier => "modifier",
            Self::LineNote => "note",
            Self::PaymentKind => "payment kind",
            Self::PaymentReference => "payment reference",
            Self::TransitionReference => "transition reference",
            Self::AckNote => "acknowledgement note",
        }
    }

    /// The longest value a writer may store, in bytes of UTF-8.
    pub fn max_bytes(self) -> usize {
        match self {
            Self::Sku | Self::LineName | Self::Modifier | Self::LineNote | Self::AckNote => {
                MAX_TEXT
            }
            // Characters are counted by the kind rule; this only bounds the work.
            Self::PaymentKind => MAX_KIND_CHARS * 4,
            Self::PaymentReference | Self::TransitionReference => MAX_REFERENCE_LEN,
        }
    }

    /// What a writer must store here, worded for [`PolicyViolation::WrongType`].
    pub fn expected(self) -> &'static str {
        match self {
            Self::Sku | Self::LineName | Self::Modifier | Self::LineNote | Self::AckNote => {
                "text of at most 500 bytes"
            }
            Self::PaymentKind => {
                "a payment kind name: 1 to 32 letters, digits, '_', '-' or single inner spaces"
            }
            Self::PaymentReference | Self::TransitionReference => {
                "a masked reference of at most 64 bytes"
            }
        }
    }

    /// The free-text field at a document path, if it is one. A modifier is named by its list
    /// (`lines.<id>.modifiers`) or by the list and an index.
    pub fn at(path: &[&str]) -> Option<Self> {
        match path {
            [keys::LINES, _, keys::SKU] => Some(Self::Sku),
            [keys::LINES, _, keys::NAME] => Some(Self::LineName),
            [keys::LINES, _, keys::NOTE] => Some(Self::LineNote),
            [keys::LINES, _, keys::MODIFIERS] | [keys::LINES, _, keys::MODIFIERS, _] => {
                Some(Self::Modifier)
            }
            [keys::PAYMENTS, _, keys::KIND] => Some(Self::PaymentKind),
            [keys::PAYMENTS, _, keys::REFERENCE] => Some(Self::PaymentReference),
            [keys::PAYMENTS, _, keys::TRANSITIONS, _, keys::REFERENCE] => {
                Some(Self::TransitionReference)
            }
            [keys::ACKS, _, keys::NOTE] => Some(Self::AckNote),
            _ => None,
        }
    }
}

/// What a writer may store in `field`: at most [`TextField::max_bytes`], no full card number
/// (see the [module docs](self)), and readable ([`check_readable`]).
///
/// The typed API calls it before writing; the relay's policy should call it (through
/// [`check_text_at`]) for every string a change writes into a free-text field.
pub fn check_free_text(field: TextField, value: &str) -> Result<(), ModelError> {
    if value.len() > field.max_bytes() {
        return Err(ModelError::InvalidValue {
            field: field.name(),
            value: format!("{} bytes (max {})", value.len(), field.max_bytes()),
        });
    }
    if holds_card_number(value) && !(field == TextField::Sku && is_gtin(value)) {
        return Err(ModelError::CardNumber {
            field: field.name(),
        });
    }
    check_readable(field, value)
}

/// [`check_free_text`] for the value written at a document `path`, with the policy's error:
/// a card number is [`PolicyViolation::CardNumberInReference`] in a payment or transition
/// reference and [`PolicyViolation::CardNumberInText`] anywhere else (naming the path), any
/// other refusal [`PolicyViolation::WrongType`]. A path that is not a free-text field passes.
pub fn check_text_at(path: &[&str], value: &str) -> Result<(), PolicyViolation> {
    let Some(field) = TextField::at(path) else {
        return Ok(());
    };
    check_free_text(field, value).map_err(|e| match e {
        ModelError::CardNumber { .. } if path.last() == Some(&keys::REFERENCE) => {
            PolicyViolation::CardNumberInReference(path.join("."))
        }
        ModelError::CardNumber { .. } => PolicyViolation::CardNumberInText(path.join(".")),
        _ => PolicyViolation::WrongType {
            path: path.join("."),
            expected: field.expected(),
        },
    })
}

/// What a reader accepts in `field`: a payment kind must be a name ([`check_kind_name`]);
/// every other field may hold any string.
pub fn check_readable(field: TextField, value: &str) -> Result<(), ModelError> {
    match field {
        TextField::PaymentKind => check_kind_name(value),
        _ => Ok(()),
    }
}

/// The rule for a payment kind's name, applied by the reader and (through
/// [`check_free_text`]) by every writer: 1 to [`MAX_KIND_CHARS`] characters, each a letter
/// (any script, any case), an ASCII digit, `_`, `-` or a space; no space at either end and no
/// two spaces in a row. So `gift card`, `voucher-2`, `Ticket Restaurant`, `chèque vacances`
/// and every name of the former rule (`[a-z0-9_]{1,32}`) are kind names.
pub fn check_kind_name(name: &str) -> Result<(), ModelError> {
    let chars = name.chars().count();
    let ok = (1..=MAX_KIND_CHARS).contains(&chars)
        && name
            .chars()
            .all(|c| c.is_alphabetic() || c.is_ascii_digit() || matches!(c, '_' | '-' | ' '))
        && !name.starts_with(' ')
        && !name.ends_with(' ')
        && !name.contains("  ");
    if ok {
        Ok(())
    } else {
        Err(ModelError::InvalidValue {
            field: TextField::PaymentKind.name(),
            value: shown(name),
        })
    }
}

/// A refused value as an error message may show it: quoted and cut short, and never a card
/// number.
pub(crate) fn shown(value: &str) -> String {
    const MAX_SHOWN: usize = 40;
    if holds_card_number(value) {
        return format!(
            "<{} characters holding a card number>",
            value.chars().count()
        );
    }
    if value.chars().count() > MAX_SHOWN {
        let head: String = value.chars().take(MAX_SHOWN).collect();
        return format!("{head:?}...");
    }
    format!("{value:?}")
}

/// Whether `text` holds a full card number (see the [module docs](self)).
pub fn holds_card_number(text: &str) -> bool {
    find_card_number(text).is_some()
}

/// The byte range of the first full card number in `text`, from its first digit to its last
/// (see the [module docs](self) for what counts).
pub fn find_card_number(text: &str) -> Option<Range<usize>> {
    let mut run: Vec<Digit> = Vec::new();
    for (at, c) in text.char_indices() {
        if let Some(value) = digit_value(c) {
            run.push(Digit {
                value,
                at: at..at + c.len_utf8(),
            });
        } else if !is_separator(c) {
            if let Some(found) = luhn_window(&run) {
                return Some(found);
            }
            run.clear();
        }
    }
    luhn_window(&run)
}

/// One digit of a run and where it stands in the text.
struct Digit {
    value: u8,
    at: Range<usize>,
}

/// The first window of [`CARD_DIGITS`] digits of `run` that passes the Luhn check.
fn luhn_window(run: &[Digit]) -> Option<Range<usize>> {
    if run.len() < *CARD_DIGITS.start() {
        return None;
    }
    for start in 0..run.len() {
        for len in CARD_DIGITS {
            let Some(window) = run.get(start..start + len) else {
                break;
            };
            if luhn_valid(window.iter().map(|d| d.value)) {
                let first = window.first()?.at.start;
                let last = window.last()?.at.end;
                return Some(first..last);
            }
        }
    }
    None
}

/// The Luhn check over `digits`, most significant first.
pub(crate) fn luhn_valid(digits: impl DoubleEndedIterator<Item = u8>) -> bool {
    let sum: u32 = digits
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d);
            if !i.is_multiple_of(2) {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether `s` is exactly a GTIN-13 or GTIN-14 (digits only) with a valid GS1 check digit.
fn is_gtin(s: &str) -> bool {
    if !matches!(s.len(), 13 | 14) || !s.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    // From the right, the check digit has weight 1, then 3, 1, 3, ...
    let sum: u32 = s
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| u32::from(b - b'0') * if !i.is_multiple_of(2) { 3 } else { 1 })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether `c` keeps a run of digits going.
fn is_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            // Dots: full stop, middle dot, one dot leader, hyphenation point, ideographic and
            // full-width/half-width full stops, katakana middle dot.
            '.' | '\u{B7}' | '\u{2024}' | '\u{2027}' | '\u{3002}' | '\u{FF0E}' | '\u{FF61}' | '\u{30FB}'
            // Dashes: hyphen-minus, soft hyphen, the General Punctuation dashes, minus sign,
            // small and full-width hyphen-minus.
            | '-' | '\u{AD}' | '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE58}' | '\u{FE63}'
            | '\u{FF0D}'
            // Invisible: zero-width space/joiners, direction marks and embeddings, word joiner
            // and invisible operators, isolates, Mongolian vowel separator, byte order mark.
            | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}' | '\u{180E}' | '\u{FEFF}'
        )
}

/// The value of `c` as a decimal digit: ASCII, any Unicode `Nd` digit, or a superscript or
/// subscript digit.
pub(crate) fn digit_value(c: char) -> Option<u8> {
    let value = match c {
        '0'..='9' => u32::from(c) - u32::from('0'),
        _ if c.is_ascii() => return None,
        '\u{B2}' => 2,
        '\u{B3}' => 3,
        '\u{B9}' => 1,
        '\u{2070}' | '\u{2074}'..='\u{2079}' => u32::from(c) - 0x2070,
        '\u{2080}'..='\u{2089}' => u32::from(c) - 0x2080,
        _ => {
            let cp = u32::from(c);
            // The last block starting at or before `c`.
            let i = ND_ZEROS
                .partition_point(|&zero| zero <= cp)
                .checked_sub(1)?;
            let offset = cp - ND_ZEROS.get(i)?;
            if offset >= 10 {
                return None;
            }
            offset
        }
    };
    u8::try_from(value).ok()
}

/// The code point of digit zero of every block of ten Unicode decimal digits (category `Nd`)
/// other than ASCII, through Unicode 17, sorted. Each block holds the digits 0 to 9 in order.
const ND_ZEROS: [u32; 76] = [
    0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6, 0x0D66,
    0x0DE6, 0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
    0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10,
    0x104A0, 0x10D30, 0x10D40, 0x11066, 0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0,
    0x11650, 0x116C0, 0x116D0, 0x116DA, 0x11730, 0x118E0, 0x11950, 0x11BF0, 0x11C50, 0x11D50,
    0x11DA0, 0x11DE0, 0x11F50, 0x16130, 0x16A60, 0x16AC0, 0x16B50, 0x16D70, 0x1CCF0, 0x1D7CE,
    0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E4F0, 0x1E5F1, 0x1E950, 0x1FBF0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digit_table_is_sorted_and_every_entry_is_numeric() {
        assert!(ND_ZEROS.windows(2).all(|w| w[0] + 10 <= w[1]));
        for zero in ND_ZEROS {
            for d in 0..10 {
                let c = char::from_u32(zero + d).unwrap();
                assert!(c.is_numeric(), "{c:?} U+{:04X}", zero + d);
                assert_eq!(digit_value(c), Some(d as u8), "U+{:04X}", zero + d);
            }
        }
        assert_eq!(digit_value('４'), Some(4));
        assert_eq!(digit_value('٧'), Some(7));
        assert_eq!(digit_value('⁹'), Some(9));
        assert_eq!(digit_value('₃'), Some(3));
        for c in [
            'a', '*', ' ', '½', '①', 'Ⅻ', '\u{FF1A}', '\u{0669}', /* last Arabic-Indic */
        ] {
            if c == '\u{0669}' {
                assert_eq!(digit_value(c), Some(9));
            } else {
                assert_eq!(digit_value(c), None, "{c:?}");
            }
        }
    }

    #[test]
    fn every_digit_rust_knows_is_numeric_and_nothing_else_is_a_digit() {
        for cp in 0..=0x10FFFF_u32 {
            if let Some(c) = char::from_u32(cp)
                && digit_value(c).is_some()
            {
                assert!(c.is_numeric(), "U+{cp:04X}");
            }
        }
    }

    #[test]
    fn windows_inside_longer_runs_are_found() {
        assert_eq!(find_card_number("AB 4111111111111111 ok"), Some(3..19));
        // Auth code, space, PAN: found (here a window starting in the auth code passes first).
        assert!(holds_card_number("123456 4111111111111111"));
        assert!(holds_card_number("4111.1111.1111.1111"));
        assert!(holds_card_number("4111  1111\t1111\u{A0}1111"));
        assert!(holds_card_number("４１１１１１１１１１１１１１１１"));
        assert!(holds_card_number(
            "ref:4111\u{200B}1111\u{200B}1111\u{200B}1111;"
        ));
        assert!(!holds_card_number("**** **** **** 1111"));
        assert!(!holds_card_number("411111******1111"));
        assert!(!holds_card_number("XXXX-1111"));
        assert!(!holds_card_number("AUTH 123456 **** **** **** 4242"));
        assert!(!holds_card_number("123456 1234"));
        // 16 digits failing Luhn whose 13- to 15-digit windows fail too.
        assert!(!holds_card_number("4111111111111113"));
        // 16 digits failing Luhn, but a 13-digit window passes: refused (the cost of testing
        // every window).
        assert!(holds_card_number("4111111111111112"));
    }

    #[test]
    fn a_gtin_sku_is_not_a_card_number() {
        // 4006381333924 is a valid EAN-13 and also passes Luhn.
        assert!(is_gtin("4006381333924"));
        assert!(luhn_valid("4006381333924".bytes().map(|b| b - b'0')));
        assert!(check_free_text(TextField::Sku, "4006381333924").is_ok());
        assert!(check_free_text(TextField::LineName, "4006381333924").is_err());
        assert!(check_free_text(TextField::Sku, "EAN 4006381333924").is_err());
        assert!(check_free_text(TextField::Sku, "4111111111111111").is_err());
    }

    #[test]
    fn kind_names() {
        for ok in [
            "voucher",
            "gift card",
            "voucher-2",
            "Ticket Restaurant",
            "chèque vacances",
            "_legacy",
            "a",
            &"x".repeat(32),
        ] {
            assert!(check_kind_name(ok).is_ok(), "{ok:?}");
            assert!(
                check_free_text(TextField::PaymentKind, ok).is_ok(),
                "{ok:?}"
            );
        }
        for bad in [
            "",
            " gift",
            "gift ",
            "gift  card",
            "gift!",
            "a.b",
            "tab\there",
            "４２",
            &"x".repeat(33),
        ] {
            assert!(check_kind_name(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            check_free_text(TextField::PaymentKind, "4111111111111111"),
            Err(ModelError::CardNumber { .. })
        ));
    }

    #[test]
    fn paths_name_fields_and_errors_never_show_a_card_number() {
        assert_eq!(TextField::at(&["lines", "x", "sku"]), Some(TextField::Sku));
        assert_eq!(
            TextField::at(&["payments", "p", "transitions", "t", "reference"]),
            Some(TextField::TransitionReference)
        );
        assert_eq!(TextField::at(&["lines", "x", "unit_price"]), None);
        assert!(matches!(
            check_text_at(&["acks", "a", "note"], "card 4111 1111 1111 1111"),
            Err(PolicyViolation::CardNumberInText(p)) if p == "acks.a.note"
        ));
        assert!(matches!(
            check_text_at(&["payments", "p", "reference"], "4111 1111 1111 1111"),
            Err(PolicyViolation::CardNumberInReference(p)) if p == "payments.p.reference"
        ));
        assert!(matches!(
            check_text_at(&["payments", "p", "kind"], "no!"),
            Err(PolicyViolation::WrongType { .. })
        ));
        assert_eq!(
            check_text_at(&["status", "s", "status"], "4111111111111111"),
            Ok(())
        );
        let e = check_kind_name("4111111111111111!")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("4111"), "{e}");
    }
}
