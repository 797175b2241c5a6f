//! Constrained decoding: a request's [`Grammar`] compiled by llguidance against the
//! model's vocabulary, and the per-sequence matcher that says which tokens may come
//! next. The vocabulary (each token's bytes, read from the tokenizer's own JSON) is
//! built once per model, on the first constrained request; a grammar is compiled per
//! request (milliseconds: llguidance parses lazily, computing each step's mask from
//! the grammar's state rather than precomputing an automaton over the vocabulary).
//!
//! JSON is constrained to compact separators (`", "` and `": "`, no other whitespace
//! between tokens): small models otherwise fill a flexible grammar's whitespace with
//! newlines up to `max_new_tokens`. A schema may set its own with llguidance's
//! `x-guidance` key. Schema keywords llguidance does not implement are refused by
//! name (its strict mode), never ignored.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use tokenizers::Tokenizer;

use super::adjust::keep_only;
use crate::HandlerError;
use crate::generate::Grammar;

/// A model's vocabulary as llguidance sees it, ready to compile grammars against.
pub struct GrammarVocabulary {
    factory: ParserFactory,
    eos: Vec<u32>,
}

impl std::fmt::Debug for GrammarVocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarVocabulary")
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// The tokenizer behind a [`TokTrie`]: llguidance tokenizes literal text of a grammar
/// (forced tokens) with it.
struct TokenizerVocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for TokenizerVocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(bytes, |text| {
            self.tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

impl GrammarVocabulary {
    /// The vocabulary of `tokenizer` for a model whose logits have `logits` entries
    /// (a padded embedding has more than the tokenizer's tokens: those are never
    /// allowed), ending generation with any of `eos`.
    pub fn new(tokenizer: &Tokenizer, logits: usize, eos: &[u32]) -> Result<Self, HandlerError> {
        let unsupported = |why: String| {
            HandlerError::Input(format!(
                "this model's tokenizer cannot be used for constrained decoding: {why}"
            ))
        };
        let json = serde_json::to_value(tokenizer).map_err(|e| unsupported(e.to_string()))?;
        // llguidance's reader asserts on vocabularies it does not expect: a panic there
        // is a refusal, not a crash.
        let words = std::panic::catch_unwind(|| {
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())
        })
        .map_err(|_| unsupported("its vocabulary could not be read".into()))?
        .map_err(unsupported)?;
        let mut words = words;
        let size = logits.max(words.len());
        words.resize(size, Vec::new());
        let Some(&first_eos) = eos.first() else {
            return Err(unsupported("it has no end-of-sequence token".into()));
        };
        if let Some(id) = eos.iter().find(|&&id| id as usize >= size) {
            return Err(unsupported(format!(
                "end-of-sequence token {id} is past its {size} tokens"
            )));
        }
        let info = TokRxInfo::new(size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(TokenizerVocabulary {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| unsupported(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory,
            eos: eos.to_vec(),
        })
    }

    /// A fresh matcher for `grammar`, or a client error naming what is wrong with it.
    pub fn compile(&self, grammar: &Grammar) -> Result<TokenConstraint, HandlerError> {
        let parser = self
            .factory
            .create_parser(top_level(grammar))
            .map_err(|e| HandlerError::Input(format!("the grammar cannot be used: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(HandlerError::Input(format!(
                "the grammar cannot be used: {error}"
            )));
        }
        Ok(TokenConstraint {
            matcher,
            eos: self.eos.clone(),
        })
    }
}

/// llguidance's grammar for ours.
fn top_level(grammar: &Grammar) -> TopLevelGrammar {
    match grammar {
        Grammar::JsonObject => TopLevelGrammar::from_json_schema(compact(serde_json::json!({
            "type": "object"
        }))),
        Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema.clone())),
        Grammar::Regex(regex) => TopLevelGrammar::from_regex(regex),
        Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        Grammar::Choice(choices) => {
            let alternatives: Vec<String> = choices.iter().map(|c| regex_literal(c)).collect();
            TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
        }
    }
}

/// `schema` with compact JSON separators, unless it chose its own.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut()
        && !object.contains_key("x-guidance")
    {
        object.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
    }
    schema
}

/// A regular expression matching exactly `text`.
fn regex_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~/\"".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One sequence's place in its grammar.
pub struct TokenConstraint {
    matcher: Matcher,
    eos: Vec<u32>,
}

/// A matcher of its own, at the same place in the grammar.
impl Clone for TokenConstraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            eos: self.eos.clone(),
        }
    }
}

impl std::fmt::Debug for TokenConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConstraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl TokenConstraint {
    /// The tokens the grammar allows next (only end-of-sequence tokens once the
    /// grammar is complete).
    pub fn allowed(&mut self) -> Result<SimpleVob, HandlerError> {
        self.matcher
            .compute_mask_or_eos()
            .map_err(|e| HandlerError::Input(format!("constrained decoding failed: {e}")))
    }

    /// Removes from `logits` every token the grammar does not allow next.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), HandlerError> {
        let allowed = self.allowed()?;
        let size = allowed.len();
        keep_only(logits, |id| (id as usize) < size && allowed.is_allowed(id));
        Ok(())
    }

    /// Moves the grammar on past token `id` (an end-of-sequence token ends it instead).
    pub fn consume(&mut self, id: u32) -> Result<(), HandlerError> {
        if self.eos.contains(&id) {
            return Ok(());
        }
        self.matcher
            .consume_token(id)
            .map_err(|e| HandlerError::Input(format!("constrained decoding failed: {e}")))
    }

    /// Whether the text so far is a whole sentence of the grammar.
    pub fn is_complete(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{BYTE_LEVEL_EOS, byte_level_tokenizer_json};

    fn vocabulary() -> (Tokenizer, GrammarVocabulary) {
        let tokenizer =
            Tokenizer::from_bytes(byte_level_tokenizer_json().to_string()).expect("tokenizer");
        // Four padding rows past the tokenizer's 260 tokens, as padded embeddings have.
        let vocabulary =
            GrammarVocabulary::new(&tokenizer, 264, &[BYTE_LEVEL_EOS]).expect("vocabulary");
        (tokenizer, vocabulary)
    }

    fn allowed(constraint: &mut TokenConstraint) -> Vec<u32> {
        let mut logits = vec![0.0f32; 264];
        constraint.mask(&mut logits).expect("mask");
        (0..264u32)
            .filter(|&id| logits[id as usize].is_finite())
            .collect()
    }

    #[test]
    fn a_regex_allows_exactly_the_tokens_that_continue_it_then_only_eos() {
        let (_, vocabulary) = vocabulary();
        let mut constraint = vocabulary
            .compile(&Grammar::Regex("a[bc]".into()))
            .expect("compiles");
        assert_eq!(allowed(&mut constraint), vec![u32::from(b'a')]);
        assert!(!constraint.is_complete());
        constraint.consume(u32::from(b'a')).expect("a");
        assert_eq!(
            allowed(&mut constraint),
            vec![u32::from(b'b'), u32::from(b'c')]
        );
        constraint.consume(u32::from(b'c')).expect("c");
        assert!(constraint.is_complete());
        assert_eq!(allowed(&mut constraint), vec![BYTE_LEVEL_EOS]);
    }

    #[test]
    fn json_masks_allow_multi_byte_tokens_and_compact_separators_only() {
        let (tokenizer, vocabulary) = vocabulary();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "required": ["a"],
            "additionalProperties": false,
        });
        let mut constraint = vocabulary
            .compile(&Grammar::JsonSchema(schema))
            .expect("compiles");
        let first = allowed(&mut constraint);
        let brace_quote = tokenizer.token_to_id("{\"").expect("merged token");
        // The bytes `{"a": ` are forced: llguidance allows their canonical tokens.
        assert!(first.contains(&brace_quote), "{first:?}");
        assert!(!first.contains(&u32::from(b' ')), "no leading whitespace");
        assert!(!first.contains(&BYTE_LEVEL_EOS));
        for id in tokenizer
            .encode("{\"a\":", false)
            .expect("encode")
            .get_ids()
        {
            constraint.consume(*id).expect("consumes");
        }
        assert_eq!(
            allowed(&mut constraint),
            vec![u32::from(b' ')],
            "the key separator is \": \""
        );
        for id in tokenizer.encode(" 12}", false).expect("encode").get_ids() {
            constraint.consume(*id).expect("consumes");
        }
        assert_eq!(allowed(&mut constraint), vec![BYTE_LEVEL_EOS]);
    }

    #[test]
    fn choices_json_objects_and_lark_compile_and_bad_grammars_are_refused_by_name() {
        let (_, vocabulary) = vocabulary();
        let mut choice = vocabulary
            .compile(&Grammar::Choice(vec!["yes".into(), "no.".into()]))
            .expect("choice");
        assert_eq!(allowed(&mut choice), vec![u32::from(b'n'), u32::from(b'y')]);
        let mut object = vocabulary.compile(&Grammar::JsonObject).expect("object");
        assert!(allowed(&mut object).contains(&u32::from(b'{')));
        let mut lark = vocabulary
            .compile(&Grammar::Lark("start: \"x\" | \"y\" \"z\"".into()))
            .expect("lark");
        assert_eq!(allowed(&mut lark), vec![u32::from(b'x'), u32::from(b'y')]);
        for (grammar, names) in [
            (Grammar::Regex("(".into()), "grammar"),
            (
                Grammar::Lark("start: undefined_rule".into()),
                "undefined_rule",
            ),
            (
                Grammar::JsonSchema(serde_json::json!({"type": "array", "uniqueItems": true})),
                "uniqueItems",
            ),
        ] {
            let refused = vocabulary
                .compile(&grammar)
                .expect_err(&format!("{grammar:?} refused"));
            assert!(
                matches!(&refused, HandlerError::Input(m) if m.contains(names)),
                "{grammar:?}: {refused:?}"
            );
        }
    }

    #[test]
    fn a_tokenizer_llguidance_cannot_read_is_refused_not_a_panic() {
        let wordpiece =
            Tokenizer::from_bytes(crate::testing::tokenizer_json().to_string()).expect("tokenizer");
        let refused = GrammarVocabulary::new(&wordpiece, 100, &[2]).expect_err("refused");
        assert!(
            matches!(&refused, HandlerError::Input(m) if m.contains("constrained decoding")),
            "{refused:?}"
        );
    }
}
