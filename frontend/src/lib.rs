//! tiermq frontend
