//! MLflow tracking for kd runs (work in progress).
