//! Why something a user gave is refused, as a value: what kind of wrong it is
//! (the SQL layer maps each kind to one SQLSTATE, in `api::raise`), the field
//! it is about (the error's DETAIL), the message, and a hint where the user
//! can act on one.

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value its field does not accept (SQLSTATE 22023 invalid_parameter_value).
    InvalidValue,
    /// A row that breaks a rule of its table (23514 check_violation).
    CheckViolation,
    /// A change a stored row forbids (23001 restrict_violation).
    RestrictViolation,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: Kind,
    /// The column (or, with `of_argument`, the function argument) the refusal is about.
    pub field: String,
    pub of_argument: bool,
    pub message: String,
    pub hint: Option<String>,
}

impl Refusal {
    /// `invalid <field>: <why>` (22023).
    pub fn invalid(field: &str, why: impl std::fmt::Display) -> Refusal {
        Refusal {
            kind: Kind::InvalidValue,
            field: field.to_string(),
            message: format!("invalid {field}: {why}"),
            hint: None,
            of_argument: false,
        }
    }

    /// A message of its own about `field`, of `kind`.
    pub fn new(kind: Kind, field: &str, message: impl Into<String>) -> Refusal {
        Refusal { kind, field: field.to_string(), message: message.into(), hint: None, of_argument: false }
    }

    /// The field is a function's argument, not a column.
    pub fn argument(mut self) -> Refusal {
        self.of_argument = true;
        self
    }

    /// The error's DETAIL: which column or argument.
    pub fn detail(&self) -> String {
        format!("{}: {}", if self.of_argument { "argument" } else { "column" }, self.field)
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Refusal {
        self.hint = Some(hint.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_value_names_its_field_first() {
        let r = Refusal::invalid("partners", "the list holds NULL").hint("use NULL for every partner");
        assert_eq!(r.to_string(), "invalid partners: the list holds NULL");
        assert_eq!(
            (r.kind, r.detail(), r.hint.as_deref()),
            (Kind::InvalidValue, "column: partners".into(), Some("use NULL for every partner"))
        );
        assert_eq!(Refusal::invalid("scheme", "x").argument().detail(), "argument: scheme");
    }
}
