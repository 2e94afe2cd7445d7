//! The `fastlora` command line: inspect models, compute parity logits, merge adapters.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fastlora::llama::FloatDtype;
use fastlora::{CpuBackend, FastLanguageModel, LoraConfig, PeftModel, logits_command};

/// Unsloth-class LoRA fine-tuning for Llama-family models, in Rust.
#[derive(Parser, Debug)]
#[command(name = "fastlora", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Architecture, parameter counts, and what LoRA would patch.
    ///
    /// Example: fastlora info --model tests/fixtures/llama-tiny --r 8
    Info {
        /// Model folder, .safetensors file, or hub id (owner/name[@revision]).
        #[arg(long)]
        model: String,
        /// LoRA rank to report for.
        #[arg(long, default_value_t = 16)]
        r: usize,
        /// LoRA alpha to report for.
        #[arg(long, default_value_t = 16.0)]
        lora_alpha: f64,
        /// Comma-separated target modules (default: all seven projections).
        #[arg(long, value_delimiter = ',')]
        target_modules: Option<Vec<String>>,
    },
    /// Logits and mean next-token loss on given token ids: the parity tool.
    ///
    /// Example: fastlora logits --model tests/fixtures/llama-tiny --adapter tests/fixtures/llama-tiny-lora
    ///   --input-ids tests/fixtures/inputs.safetensors --out logits.safetensors
    Logits {
        /// Model folder or hub id.
        #[arg(long)]
        model: String,
        /// PEFT adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// safetensors file with an i64 `input_ids` tensor, [batch, seq].
        #[arg(long)]
        input_ids: PathBuf,
        /// Output safetensors file: f32 `logits` [batch, seq, vocab] and `loss` [1].
        #[arg(long)]
        out: PathBuf,
    },
    /// Merge an adapter into its base model and write an HF safetensors folder.
    ///
    /// Example: fastlora merge --model tests/fixtures/llama-tiny --adapter tests/fixtures/llama-tiny-lora --out merged
    Merge {
        /// Base model folder or hub id.
        #[arg(long)]
        model: String,
        /// PEFT adapter folder.
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Weight dtype on disk: float32, bfloat16 or float16.
        #[arg(long, default_value = "float32", value_parser = parse_dtype)]
        dtype: FloatDtype,
    },
}

fn parse_dtype(name: &str) -> Result<FloatDtype, String> {
    FloatDtype::from_torch_name(name)
        .ok_or_else(|| format!("unknown dtype `{name}`: use float32, bfloat16 or float16"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> fastlora::Result<()> {
    let device = Default::default();
    match cli.command {
        Command::Info {
            model,
            r,
            lora_alpha,
            target_modules,
        } => {
            let base = FastLanguageModel::<CpuBackend>::from_pretrained(&model, &device)?;
            println!("{}", base.config);
            let mut builder = LoraConfig::builder().r(r).lora_alpha(lora_alpha);
            if let Some(targets) = target_modules {
                builder = builder.target_modules(targets);
            }
            let peft = base.get_peft_model(builder.build()?)?;
            print!("{}", peft.report);
            peft.print_trainable_parameters();
        }
        Command::Logits {
            model,
            adapter,
            input_ids,
            out,
        } => {
            let loss = logits_command::<CpuBackend>(
                &model,
                adapter.as_deref(),
                &input_ids,
                &out,
                &device,
            )?;
            println!("loss {loss:.6} → {}", out.display());
        }
        Command::Merge {
            model,
            adapter,
            out,
            dtype,
        } => {
            let base = FastLanguageModel::<CpuBackend>::from_pretrained(&model, &device)?;
            let merged = PeftModel::from_pretrained(base, &adapter)?.merge_and_unload();
            merged.save_pretrained(&out, dtype)?;
            println!(
                "merged {} into {} → {}",
                adapter.display(),
                model,
                out.display()
            );
        }
    }
    Ok(())
}
