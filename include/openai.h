/*
 * openai: the OpenAI-compatible face of the pool, GET /v1/models and
 * POST /v1/chat/completions. Stateless (no history is kept), streamed or
 * not, through the same upstream, client keys, rate limits and metrics as
 * /api/chat, with OpenAI's request, chunk and error shapes, so that an
 * OpenAI client can use chatfcgi as its base URL.
 */
#ifndef CHATFCGI_OPENAI_H
#define CHATFCGI_OPENAI_H

struct worker;

void openai_models(struct worker *w);
void openai_completions(struct worker *w);

#endif
