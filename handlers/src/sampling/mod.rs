//! What happens to a step's logits before a token is drawn from them: OpenAI's
//! penalties and `logit_bias` ([`adjust`], pure arithmetic on one row), and a grammar's
//! mask of the tokens that may come next ([`grammar`], llguidance against the model's
//! vocabulary). [`crate::tasks::text_generation`] applies them in that order, then
//! samples.

pub mod adjust;
pub mod grammar;

pub use grammar::{GrammarVocabulary, TokenConstraint};
