//! Feeds arbitrary bytes to the spec reader: it must never panic, whatever it is given, and
//! every diagnostic must point inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(diagnostics) = cib_core::spec::parse(&text) {
        assert!(!diagnostics.is_empty());
        // YAML counts `\r\n` and a lone `\r` as one line break each, like `\n`.
        let lines = text.replace("\r\n", "\n").replace('\r', "\n").lines().count().max(1) as u32 + 1;
        for d in diagnostics {
            assert!(d.pos.line >= 1 && d.pos.line <= lines, "{d:?} outside {lines} lines");
        }
    }
    let _ = cib_core::spec::to_json(&text);
});
