//! Fuzzes the qrexec descriptor: `find_end` on the raw stream, then `parse` on what it
//! returns (and on the whole input). Whatever parses must name a valid VM and must come
//! back unchanged after formatting.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qlog_rpc::descriptor::{find_end, parse, validate_vm_name, MAX_DESCRIPTOR_LEN};
use qlog_rpc::INGEST_SERVICE;

fuzz_target!(|data: &[u8]| {
    match find_end(data) {
        Ok(Some(n)) => {
            assert!(n >= 1 && n <= MAX_DESCRIPTOR_LEN && n <= data.len());
            assert_eq!(data[n - 1], 0);
            assert!(!data[..n - 1].contains(&0), "find_end must stop at the first NUL");
            check(&data[..n]);
        }
        Ok(None) => assert!(data.len() < MAX_DESCRIPTOR_LEN && !data.contains(&0)),
        Err(_) => assert!(data.len() >= MAX_DESCRIPTOR_LEN),
    }
    check(data);
});

fn check(raw: &[u8]) {
    let Ok(d) = parse(raw, INGEST_SERVICE) else { return };
    assert_eq!(d.service, INGEST_SERVICE);
    validate_vm_name(&d.source_vm).expect("parse returned an invalid VM name");
    assert!(!d.argument.contains(' '));
    let text = d.to_string();
    assert_eq!(parse(text.as_bytes(), INGEST_SERVICE).as_ref(), Ok(&d), "format/parse");
    // Callers hand parse what find_end cut, which never holds a NUL before the end.
    if !text.contains('\0') {
        let mut wire = text.into_bytes();
        wire.push(0);
        wire.extend_from_slice(b"caller data");
        let n = find_end(&wire).unwrap().expect("a formatted descriptor ends at its NUL");
        assert_eq!(parse(&wire[..n], INGEST_SERVICE), Ok(d));
    }
}
