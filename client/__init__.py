"""The consumer: routing, sessions with failover, generate(), and the OpenAI-compatible gateway. (Not built yet.)"""
