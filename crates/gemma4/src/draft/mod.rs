//! Speculative decoding with Gemma 4's assistant drafters (`gemma4_assistant`,
//! transformers' `Gemma4AssistantForCausalLM` and `SinglePositionMultiTokenCandidateGenerator`).
//!
//! A drafter is a small decoder whose layers have queries only: it reads the target's
//! keys and values, its final hidden state and its embedding of the last token, and
//! proposes several tokens from one position. The target then checks them all in one
//! forward pass ([`crate::generate::speculative`]).
//!
//! - [`config`]: the drafter's `config.json` and `num_assistant_tokens`.
//! - [`drafter`]: loading (matched against the target) and one drafting step.
//! - [`centroid_head`]: the clustered head of E2B/E4B's drafters.

pub mod centroid_head;
pub mod config;
pub mod drafter;

pub use config::{DrafterConfig, DEFAULT_DRAFT_TOKENS};
pub use drafter::{DraftKv, DraftStep, Drafter};
