//! Writes `tests/fixtures/fastlora-made/`: adapters made by fastlora, with fastlora's logits,
//! for `tests/scripts/check_with_peft.py` to load in PEFT.
//!
//! `cargo run -p fastlora-tests --example make_fastlora_adapters`

fn main() -> fastlora::Result<()> {
    let out = fastlora_tests::fixture("fastlora-made");
    fastlora_tests::make_fastlora_adapters(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}
