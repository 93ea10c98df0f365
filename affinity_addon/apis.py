"""APIs: the wire format of a request/response, independent of who hosts it.

One name for the concept everywhere (rules `api:`, records `provider`, usage tables).
"""

# APIs: the wire format of a request/response, independent of who hosts it.
# /v1/messages (Anthropic, Bedrock InvokeModel and /anthropic/v1/messages, Vertex rawPredict,
# OpenRouter /messages)
ANTHROPIC = "anthropic"
OPENAI_CHAT = "openai-chat"  # /chat/completions (OpenAI, xAI, OpenRouter, DeepSeek, Kimi, Qwen, Gemini-compat...)
OPENAI_RESPONSES = "openai-responses"  # /responses (OpenAI, xAI, Codex backend, OpenRouter)
GEMINI = "gemini"  # generativelanguage :generateContent / :streamGenerateContent (also Vertex)
# Amazon Bedrock Converse / ConverseStream: `system`, `messages[].content` and `toolConfig.tools`
# as lists of one-key blocks, cache breakpoints as `{"cachePoint": {...}}` blocks of their own
# (https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_Converse.html).
BEDROCK_CONVERSE = "bedrock-converse"
APIS = (ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES, GEMINI, BEDROCK_CONVERSE)
