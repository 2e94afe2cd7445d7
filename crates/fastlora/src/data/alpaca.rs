//! The Alpaca prompt, as Stanford Alpaca and Unsloth's notebooks write it.

/// The preamble of records with an `input`.
const WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input \
                          that provides further context. Write a response that appropriately \
                          completes the request.";
/// The preamble of records without one.
const WITHOUT_INPUT: &str = "Below is an instruction that describes a task. Write a response \
                             that appropriately completes the request.";

/// The Alpaca prompt for `instruction` and `input` (blank input: the template without the
/// `### Input:` section), ending with `"### Response:\n"`: the response follows it directly.
/// Use it at inference to ask a model trained on Alpaca data.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!("{WITHOUT_INPUT}\n\n### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!(
            "{WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_with_and_without_input() {
        assert_eq!(
            alpaca_prompt("Add 2 and 3.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
        );
        assert_eq!(
            alpaca_prompt("Translate.", "chat"),
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n"
        );
    }
}
