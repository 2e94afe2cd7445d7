//! The `fastlora` command line: train, generate, inspect models, compute parity logits, export
//! and merge.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fastlora::llama::FloatDtype;
use fastlora::train::{TrainArgs, train_command};
use fastlora::{
    ChatMessage, ChatTemplate, CpuBackend, FastLanguageModel, GenerationConfig, LoadOptions,
    LoraConfig, PeftModel, eos_token_ids, generate, logits_command,
};

/// Unsloth-class LoRA fine-tuning for Llama-family models, in Rust.
#[derive(Parser, Debug)]
#[command(name = "fastlora", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fine-tune with LoRA. With no arguments: the built-in tiny Llama on the bundled demo set.
    ///
    /// Examples:
    ///   fastlora train
    ///   fastlora train --model ./SmolLM2-135M --dataset alpaca.jsonl --r 16 --lora-alpha 16 --lr 2e-4 --max-steps 60
    ///   fastlora train --config run.toml
    ///   fastlora train --resume outputs/checkpoint-40
    Train(Box<TrainArgs>),
    /// End-to-end LoRA training steps on a random-weight model of a public shape, timed like
    /// the HF+PEFT and Unsloth peer scripts (r = alpha = 16 on all seven projections, AdamW,
    /// median step after warm-up); prints one JSON line and the per-phase times.
    ///
    /// Example: fastlora bench --device cuda --shape smollm2-135m --batch 8 --seq 2048
    Bench(Box<fastlora::bench::BenchArgs>),
    /// Architecture, parameter counts, and what LoRA would patch.
    ///
    /// Example: fastlora info --model tests/fixtures/llama-tiny --r 8
    Info {
        /// Model folder, .safetensors file, or hub id (owner/name[@revision]).
        #[arg(long)]
        model: String,
        /// Keep a .gguf model's quantized projections quantized in memory (dequantized per
        /// layer on the fly).
        #[arg(long)]
        quantized_base: bool,
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
    /// Generate text from a prompt (KV cache; greedy by default).
    ///
    /// Example: fastlora generate --model outputs/builtin-tiny-llama --adapter outputs/adapter
    ///   --format alpaca --prompt "What is the capital of France?"
    Generate {
        /// Model folder or hub id.
        #[arg(long)]
        model: String,
        /// Keep a .gguf model's quantized projections quantized in memory (dequantized per
        /// layer on the fly).
        #[arg(long)]
        quantized_base: bool,
        /// PEFT adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The prompt (a user message when the chat template is used).
        #[arg(long)]
        prompt: String,
        /// How the prompt is wrapped: auto (the chat template when the tokenizer has one),
        /// chat, alpaca, or raw.
        #[arg(long, default_value = "auto")]
        format: PromptFormat,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Sample among the k most probable tokens.
        #[arg(long)]
        top_k: Option<usize>,
        /// Nucleus sampling threshold.
        #[arg(long)]
        top_p: Option<f64>,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
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
    /// Write a model (e.g. a llama.cpp .gguf file, dequantized) as an HF safetensors folder:
    /// config.json, model.safetensors, tokenizer.json, tokenizer_config.json (chat template).
    ///
    /// Example: fastlora export --model SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-hf
    Export {
        /// Model: .gguf file, folder or hub id.
        #[arg(long)]
        model: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Weight dtype on disk: float32, bfloat16 or float16.
        #[arg(long, default_value = "float32", value_parser = parse_dtype)]
        dtype: FloatDtype,
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

/// How `generate` wraps the prompt.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PromptFormat {
    Auto,
    Chat,
    Alpaca,
    Raw,
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

/// Loads `model` on the CPU, its GGUF projections kept quantized when asked.
fn load(
    model: &str,
    quantized_base: bool,
    device: &burn::backend::ndarray::NdArrayDevice,
) -> fastlora::Result<FastLanguageModel<CpuBackend>> {
    FastLanguageModel::from_pretrained_with(model, LoadOptions { quantized_base }, device)
}

fn run(cli: Cli) -> fastlora::Result<()> {
    let device = Default::default();
    match cli.command {
        Command::Train(args) => train_command(*args)?,
        Command::Bench(args) => {
            fastlora::bench::bench_command(*args)?;
        }
        Command::Info {
            model,
            quantized_base,
            r,
            lora_alpha,
            target_modules,
        } => {
            let base = load(&model, quantized_base, &device)?;
            println!("{}", base.config);
            if quantized_base {
                println!("{}", base.base_memory_report());
            }
            let mut builder = LoraConfig::builder().r(r).lora_alpha(lora_alpha);
            if let Some(targets) = target_modules {
                builder = builder.target_modules(targets);
            }
            let peft = base.get_peft_model(builder.build()?)?;
            print!("{}", peft.report);
            peft.print_trainable_parameters();
        }
        Command::Generate {
            model,
            quantized_base,
            adapter,
            prompt,
            format,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
        } => {
            let base = load(&model, quantized_base, &device)?;
            let stop = eos_token_ids(&base);
            let peft = match adapter {
                Some(dir) => Some(PeftModel::from_pretrained(base.clone(), &dir)?.for_inference()),
                None => None,
            };
            let net = peft.as_ref().map_or(&base.model, |p| p.model());
            let tokenizer =
                base.tokenizer
                    .as_ref()
                    .ok_or_else(|| fastlora::FastLoraError::Input {
                        path: base.source.clone(),
                        message: "generation needs a tokenizer.json beside the model".to_string(),
                    })?;
            let text = match (format, ChatTemplate::from_tokenizer(tokenizer)?) {
                (PromptFormat::Alpaca, _) => fastlora::alpaca_prompt(&prompt, ""),
                (PromptFormat::Raw, _) | (PromptFormat::Auto, None) => prompt,
                (PromptFormat::Chat | PromptFormat::Auto, Some(template)) => {
                    template.render(&[ChatMessage::user(prompt)], true)?
                }
                (PromptFormat::Chat, None) => {
                    return Err(fastlora::FastLoraError::Input {
                        path: base.source.clone(),
                        message: "--format chat: the tokenizer has no chat_template".to_string(),
                    });
                }
            };
            let ids = tokenizer.encode(&text, false)?;
            let mut config = GenerationConfig::new(max_new_tokens)
                .with_temperature(temperature)
                .with_seed(seed)
                .with_stop_token_ids(stop);
            config.top_k = top_k;
            config.top_p = top_p;
            let out = generate(net, &ids, &config)?;
            println!("{}", tokenizer.decode(&out, true)?);
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
        Command::Export { model, out, dtype } => {
            let base = FastLanguageModel::<CpuBackend>::from_pretrained(&model, &device)?;
            base.save_pretrained(&out, dtype)?;
            println!("exported {model} → {}", out.display());
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
