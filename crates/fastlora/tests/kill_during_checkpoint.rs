//! A `fastlora train` process killed at arbitrary moments — checkpoint writes included — always
//! leaves its latest complete checkpoint loadable and resumable.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fastlora::train::{TrainConfig, Trainer, latest_checkpoint};
use fastlora::{CpuBackend, FastLanguageModel, PeftModel};

#[test]
fn killed_training_leaves_a_loadable_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let model_dir =
        fastlora::materialize_builtin_model(&out.path().join("builtin-tiny-llama")).unwrap();
    let mut kills = 0;
    // Kill after increasingly long runs: each lands somewhere in a step or a save (every step
    // saves), and the next run resumes from what the previous one left.
    for delay_ms in [1500u64, 1900, 2300, 2700, 3100] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fastlora"))
            .args([
                "train",
                "--save-steps",
                "1",
                "--max-steps",
                "10000",
                "--output-dir",
            ])
            .arg(out.path())
            .args(
                latest_checkpoint(out.path())
                    .map(|c| vec!["--resume".into(), c.into_os_string()])
                    .unwrap_or_default(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(delay_ms) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();

        if let Some(checkpoint) = latest_checkpoint(out.path()) {
            let device = Default::default();
            let base = FastLanguageModel::<CpuBackend>::from_pretrained(
                model_dir.to_str().unwrap(),
                &device,
            )
            .unwrap();
            let peft = PeftModel::from_pretrained(base, &checkpoint)
                .unwrap_or_else(|e| panic!("{} does not load: {e}", checkpoint.display()));
            let config = TrainConfig {
                output_dir: out.path().to_path_buf(),
                ..TrainConfig::default()
            };
            let trainer = Trainer::resume(peft, config, &checkpoint).unwrap();
            assert!(trainer.state.step >= 1);
        }
    }
    assert!(kills >= 3, "the runs ended before they could be killed");
    assert!(
        latest_checkpoint(out.path()).is_some(),
        "no checkpoint survived"
    );
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let out = tempfile::tempdir().unwrap();
    fastlora::materialize_builtin_model(&out.path().join("builtin-tiny-llama")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fastlora"))
        .args(["train", "--max-steps", "100000", "--output-dir"])
        .arg(out.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for training to be under way (metrics rows appear), then send SIGINT.
    let metrics = out.path().join("metrics.csv");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "exit status {:?}", output.status);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("interrupted: checkpoint saved at step"),
        "{stdout}"
    );
    let checkpoint = latest_checkpoint(out.path()).expect("a checkpoint");
    assert!(checkpoint.join("adapter_model.safetensors").is_file());
}
