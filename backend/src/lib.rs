//! tiermq backend
