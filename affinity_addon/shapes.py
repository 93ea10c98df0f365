"""API shapes: the wire format of a request/response, independent of who hosts it.

One name for the concept everywhere (rules `api:`, records `provider`, usage tables).
"""

# API shapes: the wire format of a request/response, independent of who hosts it.
ANTHROPIC = "anthropic"  # /v1/messages (Anthropic, Bedrock-Messages, Vertex rawPredict, OpenRouter /messages)
OPENAI_CHAT = "openai-chat"  # /chat/completions (OpenAI, xAI, OpenRouter, DeepSeek, Kimi, Qwen, Gemini-compat...)
OPENAI_RESPONSES = "openai-responses"  # /responses (OpenAI, xAI, Codex backend, OpenRouter)
GEMINI = "gemini"  # generativelanguage :generateContent / :streamGenerateContent
SHAPES = (ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES, GEMINI)
