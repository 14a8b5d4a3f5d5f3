"""The affect lexicon and the script lines (what the two sides say)."""
from __future__ import annotations

import re



#: Words that carry affect in this corpus (a superset of what the early scripts use, and of the
#: model's transcript lexicon). Sentences after the affect exchange contain none of them.
POSITIVE_WORDS = frozenset("""
great good love loved lovely happy thanks thank wonderful glad excellent awesome nice amazing fantastic
excited fun beautiful perfect enjoy enjoyed laugh pleased proud delighted cool brilliant yes congratulations
dream earned celebrate
""".split())
NEGATIVE_WORDS = frozenset("""
sorry sad terrible angry worried bad hate awful upset afraid scared hurt hurting pain lonely tired annoyed
frustrated disappointed horrible cry cried sick stressed anxious problem unfortunately lost miss fear hard
""".split())
_AROUSAL_WORDS = frozenset("""
wow shocked thrilled panic furious incredible urgent hurry calm relaxed bored sleepy quiet peaceful slow okay fine
""".split())
AFFECT_WORDS = POSITIVE_WORDS | NEGATIVE_WORDS | _AROUSAL_WORDS
_WORD_RE = re.compile(r"[a-z0-9']+")


def affect_words(text: str) -> set[str]:
    """The affect-lexicon words (positive, negative or arousal) that ``text`` contains."""
    return {w for w in _WORD_RE.findall(text.lower()) if w in AFFECT_WORDS}


# The early affect exchange: (speaker, text) lines, tried in order while they fit in early_s.
_EARLY_SCRIPTS: dict[str, tuple[tuple[tuple[str, str], ...], ...]] = {
    "positive": (
        (("user", "Great news, I got the job! I am so happy."),
         ("avatar", "That is wonderful! I am so happy for you."),
         ("user", "Thank you, I am so excited about it."),
         ("avatar", "You really earned it, congratulations.")),
        (("user", "I have great news. I got the job, it is wonderful!"),
         ("avatar", "Great news, congratulations! That is wonderful."),
         ("user", "Thank you so much, I am so happy."),
         ("avatar", "I am glad you told me, that is amazing.")),
        (("user", "Guess what, great news! I passed the final test, I am so happy."),
         ("avatar", "That is wonderful, congratulations!"),
         ("user", "Thank you, it feels like a dream."),
         ("avatar", "You earned it, I am so proud of you.")),
    ),
    "negative": (
        (("user", "I have bad news. I lost my job today, it is terrible."),
         ("avatar", "Oh no, I am so sorry. That is terrible."),
         ("user", "I am so upset, I cried all morning."),
         ("avatar", "I am sorry you are hurting, that is so sad.")),
        (("user", "Bad news, I lost the house. I am so sad."),
         ("avatar", "I am so sorry to hear that. That is so sad."),
         ("user", "It was awful, I am so worried now."),
         ("avatar", "I am sorry, that is really hard.")),
        (("user", "Something terrible happened. I lost my dog, I am so sad."),
         ("avatar", "Oh no, I am so sorry. That is terrible news."),
         ("user", "I miss him, it is so hard."),
         ("avatar", "I am so sorry, that is awful.")),
    ),
    "neutral": (
        (("user", "I went to the office today. We had a meeting about the new plan."),
         ("avatar", "I see. How long was the meeting?"),
         ("user", "About an hour, then I went back to my desk."),
         ("avatar", "Right, and what did you do after that?")),
        (("user", "I took the bus to town this morning. It came at eight."),
         ("avatar", "I see. Which bus did you take?"),
         ("user", "The number ten, it stops near my street."),
         ("avatar", "Right, that one goes past the station.")),
        (("user", "I moved the desk to the other room. Now the window is on the left."),
         ("avatar", "Alright. Was the desk heavy?"),
         ("user", "A bit, my brother helped me carry it."),
         ("avatar", "I see, so the room looks different now.")),
    ),
}

# Affect-neutral sentences (no lexicon word): everything after the affect exchange comes from here.
_USER_NEUTRAL = (
    "The meeting is on Monday at nine.",
    "I took the train to the city this morning.",
    "We moved the table to the other side of the room.",
    "The store opens at eight on weekdays.",
    "My neighbour has a blue car.",
    "I need to buy milk, bread and rice.",
    "The bus stop is next to the post office.",
    "We usually eat dinner at seven.",
    "I read a book about old maps.",
    "The printer is on the second floor.",
    "I walked to the park and back.",
    "The report has ten pages.",
    "My brother lives in a small town near the coast.",
    "I set the alarm for six.",
    "We painted the kitchen wall white.",
    "The library closes at five on Sunday.",
    "I put the keys on the shelf by the door.",
    "I have a call with the team at noon.",
    "The window faces the street.",
    "We bought a new lamp for the desk.",
    "The recipe needs two eggs and some flour.",
    "I washed the car on Saturday.",
    "The office is on the third floor of that building.",
    "I watched a film about the ocean.",
    "My phone needs a new cable.",
    "We talked about the schedule for next week.",
    "The shop on the corner sells fruit.",
    "I wrote the list on a piece of paper.",
    "The garden has three trees and a bench.",
    "I usually take the stairs.",
    "We will check the numbers again tomorrow.",
    "The parcel came on Tuesday.",
    # phrase-internal pauses at the commas: the avatar micro-nods after some of them (listener rule b)
    "On Monday, after the meeting, I went to the shop.",
    "First we cleaned the room, then we moved the desk.",
    "The train was late, so I took the bus instead.",
    "In the morning, before work, I walk to the park.",
    "We checked the plan, the list and the numbers.",
    "At noon, when the call ends, I will send the report.",
    # questions (rising f0 at the end): the avatar raises its brows after them (listener rule d)
    "Do you know the shop on the corner?",
    "Have you seen the new bridge?",
    "Can you send me the list later?",
    "Do you think it will take long?",
    "Is the office open on Friday?",
    "Did you get my note about the room?",
    "Should we meet at the station?",
    "Do you still have the old map?",
)
_AVATAR_NEUTRAL = (
    "I see. What time does it start?",
    "Right. How far is that from here?",
    "Did you take the usual route?",
    "That makes sense. What happens next?",
    "I understand. Who else was there?",
    "And how long did that take?",
    "I see what you mean. Where is it exactly?",
    "Right, so the plan is set for now.",
    "Do you do that every week?",
    "I follow you. What did they say after that?",
    "How many people were there?",
    "Alright. Is that close to your place?",
    "So it was a normal day then.",
    "Tell me more about that.",
    "I see. And what about the other room?",
    "When will you start?",
    "Right. Do you need anything for it?",
    "So you went there on foot.",
    "Sure. What is on the list?",
    "I understand. How did you get there?",
    "Got it. Which floor is it on?",
    "Alright. What color did you pick?",
    "I see. Is it open on weekends?",
    "Right, that is the usual way.",
)
_AVATAR_BACKCHANNELS = ("Mhm.", "Yeah.", "Right.", "I see.")
_USER_BACKCHANNELS = ("Yeah.", "Right.", "Mhm.", "Sure.")

assert not any(affect_words(s) for s in _USER_NEUTRAL + _AVATAR_NEUTRAL + _AVATAR_BACKCHANNELS + _USER_BACKCHANNELS)
assert not any(affect_words(t) for lines in _EARLY_SCRIPTS["neutral"] for _, t in lines)


