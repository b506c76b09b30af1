#![no_main]
// Fuzzes the `signed_revocation` decoder of slmesh_protocol::decoders::ALL: it must never panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (_, decode) = slmesh_protocol::decoders::ALL
        .iter()
        .find(|(name, _)| *name == "signed_revocation")
        .expect("decoder is listed");
    let _ = decode(data);
});
