//! Enums whose variants are label values: one declaration gives the variants, their stable
//! names, how many there are and the list of all of them.
//!
//! Owns the `label_enum!` macro. Counters kept per variant (`[AtomicU64; Reason::COUNT]`,
//! indexed by `variant as usize`) and the metric labels they are exposed under
//! (`Reason::ALL`, `Reason::name`) come from the same declaration, so no hand-kept `NAMES` array
//! can drift from the enum. Must stay free of imports: the lowest layers use it.

/// `label_enum! { #[derive(..)] pub enum Reason { /// doc \n Variant => "name", ... } }`
/// declares the enum (fieldless, `#[repr(u8)]`, discriminants 0, 1, ... in order) and gives it
/// `COUNT`, `ALL` (in declaration order, so `ALL[r as usize] == r`) and `name()`.
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u8)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order (`ALL[v as usize] == v`).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// How many variants there are (the length of a per-variant counter array).
            pub const COUNT: usize = Self::ALL.len();

            /// The stable name of the variant: its metric label value and stats key.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}
pub(crate) use label_enum;

#[cfg(test)]
mod tests {
    label_enum! {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum Colour {
            /// The first.
            Red => "red",
            Green => "green",
            Blue => "blue",
        }
    }

    #[test]
    fn all_is_in_order_and_names_follow_the_declaration() {
        assert_eq!(Colour::COUNT, 3);
        for (i, c) in Colour::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        let names: Vec<&str> = Colour::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["red", "green", "blue"]);
    }
}
