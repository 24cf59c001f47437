"""The Ably side: the SDK connection(s), publishers, presence and history reads."""
