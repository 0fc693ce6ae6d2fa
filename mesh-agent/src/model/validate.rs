//! Strict validation of a [`StateFile`](super::StateFile) into a [`State`](super::State).
//! (being written)
use super::{State, StateFile};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid state: {0:?}")]
    Invalid(Vec<FieldError>),
}

pub fn parse_yaml(_text: &str) -> Result<State, StateError> {
    unimplemented!()
}

pub fn validate(_file: StateFile) -> Result<State, StateError> {
    unimplemented!()
}
