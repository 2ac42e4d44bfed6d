//! A Kubernetes API test server and a simulated node.
