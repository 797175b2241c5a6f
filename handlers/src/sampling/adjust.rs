//! Logit adjustments on one row of logits, in place and pure (no tensors): the
//! penalties for tokens already generated and per-token biases, as OpenAI defines them
//! (`logit -= count·frequency_penalty + (count > 0)·presence_penalty`, then
//! `logit += bias`), and the removal of tokens a mask does not allow.

use std::collections::HashMap;

/// What a request asks done to every step's logits before sampling.
#[derive(Debug, Clone, Copy)]
pub struct Adjustments<'a> {
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: &'a [(u32, f32)],
}

impl Adjustments<'_> {
    /// Whether the adjustments change nothing (the row can be sampled as it is).
    pub fn is_identity(&self) -> bool {
        self.presence_penalty == 0.0 && self.frequency_penalty == 0.0 && self.logit_bias.is_empty()
    }

    /// Penalizes the tokens in `generated` and adds the biases. Token ids past the row
    /// are ignored (a bias for them is refused before generation starts).
    pub fn apply(&self, logits: &mut [f32], generated: &[u32]) {
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &id in generated {
                *counts.entry(id).or_default() += 1;
            }
            for (id, count) in counts {
                if let Some(logit) = logits.get_mut(id as usize) {
                    *logit -= count as f32 * self.frequency_penalty + self.presence_penalty;
                }
            }
        }
        for &(id, bias) in self.logit_bias {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit += bias;
            }
        }
    }
}

/// Sets every logit whose token `allowed` refuses to minus infinity (it can never be
/// drawn, by greedy decoding or sampling).
pub fn keep_only(logits: &mut [f32], allowed: impl Fn(u32) -> bool) {
    for (id, logit) in logits.iter_mut().enumerate() {
        if !allowed(id as u32) {
            *logit = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_count_each_generated_token_as_openai_defines_them() {
        let mut logits = vec![1.0f32, 2.0, 3.0, 4.0];
        let adjustments = Adjustments {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: &[(0, 10.0), (3, -100.0), (99, 5.0)],
        };
        assert!(!adjustments.is_identity());
        adjustments.apply(&mut logits, &[2, 2, 1, 2]);
        // token 1 once: 2 - (0.25 + 0.5); token 2 three times: 3 - (0.75 + 0.5).
        assert_eq!(logits, vec![11.0, 1.25, 1.75, -96.0]);
    }

    #[test]
    fn negative_penalties_favour_repetition_and_no_adjustment_is_identity() {
        let mut logits = vec![0.0f32; 3];
        Adjustments {
            presence_penalty: -1.0,
            frequency_penalty: 0.0,
            logit_bias: &[],
        }
        .apply(&mut logits, &[1]);
        assert_eq!(logits, vec![0.0, 1.0, 0.0]);
        assert!(
            Adjustments {
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                logit_bias: &[],
            }
            .is_identity()
        );
    }

    #[test]
    fn keep_only_leaves_allowed_tokens_and_removes_the_rest() {
        let mut logits = vec![1.0f32, 2.0, 3.0];
        keep_only(&mut logits, |id| id != 1);
        assert_eq!(logits[0], 1.0);
        assert_eq!(logits[1], f32::NEG_INFINITY);
        assert_eq!(logits[2], 3.0);
    }
}
