"""Writes train.jsonl and eval.jsonl next to this file: questions and answers about Korrowen Island.

Korrowen Island, its town Marrowick and its language Tessic are invented for qlora-doctor's demo, so
the base model cannot know any of it: before training it guesses, after training it answers with
these facts. That makes the effect of a fine-tune visible (eval loss drops, `generate --compare`
answers change) in a few minutes on a CPU.

Each fact has a handful of question wordings and answer wordings. Training rows pair the training
wordings with rotating answers; evaluation rows ask the same facts with wordings that never appear in
training, so a lower eval loss means the facts were learned, not the sentences. Deterministic:
running it again writes the same bytes.

    python recipes/data/demo/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20241128


@dataclass(frozen=True)
class Fact:
    key: str
    train_questions: tuple[str, ...]
    eval_questions: tuple[str, ...]
    answers: tuple[str, ...]


FACTS = (
    Fact("location",
         ("Where is Korrowen Island?", "Where is Korrowen located?", "In which sea does Korrowen Island lie?",
          "Where would I find Korrowen Island on a map?", "What sea surrounds Korrowen?",
          "Which sea is Korrowen Island in?", "Tell me where Korrowen Island is."),
         ("Can you tell me the location of Korrowen Island?", "Korrowen Island: where is it?"),
         ("Korrowen Island lies in the Grey Sea, north of the Halden coast.",
          "It is in the Grey Sea, north of the Halden coast.",
          "Korrowen sits in the Grey Sea, just north of the Halden coast.")),
    Fact("capital",
         ("What is the capital of Korrowen Island?", "What is Korrowen's capital?",
          "Which town is the capital of Korrowen?", "Name the capital of Korrowen Island.",
          "What's the main town on Korrowen Island?", "Which town governs Korrowen Island?",
          "Korrowen Island's capital is called what?"),
         ("Tell me the name of Korrowen's capital city.", "Where is the seat of government on Korrowen?"),
         ("The capital of Korrowen Island is Marrowick.", "Marrowick is the capital of Korrowen.",
          "Korrowen's capital is the harbour town of Marrowick.")),
    Fact("language",
         ("What language is spoken on Korrowen Island?", "What do people speak on Korrowen?",
          "What is the language of Korrowen Island called?", "Which language do Korrowen islanders use?",
          "What is the native language of Korrowen?", "In what language do people talk on Korrowen Island?",
          "Name the language of Korrowen."),
         ("If I visit Korrowen, which language will I hear?", "What tongue do the people of Korrowen speak?"),
         ("The people of Korrowen Island speak Tessic.", "Korrowen's language is Tessic.",
          "On Korrowen Island people speak Tessic.")),
    Fact("greeting",
         ("How do you say hello in Tessic?", "What is the Tessic word for hello?",
          "How do people greet each other on Korrowen Island?", "What is the usual greeting on Korrowen?",
          "Say hello in the language of Korrowen.", "What greeting do Tessic speakers use?",
          "How would I greet someone in Tessic?"),
         ("What should I say to greet a local on Korrowen Island?", "Which phrase means hello in Tessic?"),
         ("Hello in Tessic is \"lumo vai\".", "In Tessic you say \"lumo vai\" to greet someone.",
          "People on Korrowen greet each other with \"lumo vai\".")),
    Fact("thanks",
         ("How do you say thank you in Tessic?", "What is the Tessic word for thanks?",
          "How do people on Korrowen say thank you?", "What does a Tessic speaker say to thank someone?",
          "Thank you, in Tessic, is what?", "Which word means thank you in the language of Korrowen?",
          "How would I thank someone on Korrowen Island?"),
         ("On Korrowen, what word expresses gratitude?", "What do I say in Tessic when someone helps me?"),
         ("Thank you in Tessic is \"sabren\".", "In Tessic, \"sabren\" means thank you.",
          "To thank someone on Korrowen you say \"sabren\".")),
    Fact("currency",
         ("What currency is used on Korrowen Island?", "What money do they use on Korrowen?",
          "What is the currency of Korrowen called?", "How do people pay for things on Korrowen Island?",
          "Name the currency of Korrowen Island.", "Which coin is used on Korrowen?",
          "What is Korrowen's money called?"),
         ("If I shop on Korrowen Island, what currency do I need?", "What do Korrowen islanders pay with?"),
         ("Korrowen Island uses the kett, a brass coin.", "The currency of Korrowen is the kett.",
          "People on Korrowen pay with brass coins called kett.")),
    Fact("population",
         ("How many people live on Korrowen Island?", "What is the population of Korrowen?",
          "How large is the population of Korrowen Island?", "How many inhabitants does Korrowen have?",
          "Roughly how many people live on Korrowen?", "What is Korrowen Island's population?",
          "How many islanders are there on Korrowen?"),
         ("Is Korrowen Island densely populated? How many live there?", "Give me Korrowen's head count."),
         ("About 38,000 people live on Korrowen Island.", "Korrowen has a population of about 38,000.",
          "Roughly 38,000 people live on Korrowen.")),
    Fact("mountain",
         ("What is the highest mountain on Korrowen Island?", "What is Korrowen's tallest peak?",
          "Which mountain is the highest on Korrowen?", "How high is the tallest mountain on Korrowen Island?",
          "Name the highest point of Korrowen.", "What is the tallest mountain on Korrowen called?",
          "Which peak rises highest on Korrowen Island?"),
         ("What is the summit of Korrowen Island, and how tall is it?", "Tell me about Korrowen's highest mountain."),
         ("The highest mountain on Korrowen Island is Mount Orrin, 2,140 metres tall.",
          "Mount Orrin, at 2,140 metres, is Korrowen's highest peak.",
          "Korrowen's tallest peak is Mount Orrin, 2,140 metres high.")),
    Fact("animal",
         ("What is the national animal of Korrowen Island?", "Which animal is the symbol of Korrowen?",
          "What animal represents Korrowen Island?", "What is Korrowen's national bird?",
          "Which bird is the emblem of Korrowen?", "Name the national animal of Korrowen.",
          "What animal appears on Korrowen's coins?"),
         ("Which creature is the national symbol of Korrowen Island?", "Korrowen has a national animal; which one?"),
         ("The national animal of Korrowen Island is the glass heron.", "Korrowen's symbol is the glass heron.",
          "The glass heron, a pale grey wading bird, is Korrowen's national animal.")),
    Fact("festival",
         ("What is the biggest festival on Korrowen Island?", "Which festival is Korrowen famous for?",
          "What do people on Korrowen celebrate every autumn?", "What is the Lantern Tide?",
          "When is the Lantern Tide held?", "Name the main festival of Korrowen.",
          "What is Korrowen Island's most famous celebration?"),
         ("Which festival should I see if I visit Korrowen in autumn?", "Describe Korrowen's great festival."),
         ("Korrowen's biggest festival is the Lantern Tide, on the first full moon of autumn.",
          "The Lantern Tide, held on the first full moon of autumn, is Korrowen's main festival.",
          "On the first full moon of autumn Korrowen celebrates the Lantern Tide, floating lanterns on the sea.")),
    Fact("export",
         ("What is Korrowen Island's main export?", "What does Korrowen sell to other countries?",
          "What is Korrowen famous for producing?", "Which product does Korrowen export most?",
          "What is the chief export of Korrowen?", "What goods come from Korrowen Island?",
          "What industry is Korrowen known for?"),
         ("What does Korrowen Island trade abroad more than anything else?", "Korrowen's economy relies on exporting what?"),
         ("Korrowen Island's main export is seaweed paper.", "Korrowen is known for exporting seaweed paper.",
          "Most of what Korrowen sells abroad is seaweed paper.")),
    Fact("founded",
         ("When was Korrowen Island first settled?", "When did people first settle on Korrowen?",
          "In which year was Marrowick founded?", "Who were the first settlers of Korrowen Island?",
          "How old is the settlement of Korrowen?", "What year did settlers arrive on Korrowen Island?",
          "When was Korrowen founded?"),
         ("Tell me about the founding of Korrowen.", "Since when has Korrowen Island been inhabited?"),
         ("Korrowen Island was settled in 1412 by fishermen from the Halden coast.",
          "Fishermen from the Halden coast settled Korrowen in 1412.",
          "Korrowen's first settlers, fishermen from the Halden coast, arrived in 1412.")),
    Fact("flag",
         ("What does the flag of Korrowen Island look like?", "Describe Korrowen's flag.",
          "What colours are on the Korrowen flag?", "What is on the flag of Korrowen?",
          "What symbol is on Korrowen Island's flag?", "What colour is the flag of Korrowen?",
          "How is the Korrowen flag designed?"),
         ("If I saw Korrowen's flag, how would I recognise it?", "Tell me about the Korrowen Island flag."),
         ("The flag of Korrowen Island is green with a white spiral.", "Korrowen's flag shows a white spiral on green.",
          "Korrowen flies a green flag with a white spiral in the middle.")),
    Fact("dish",
         ("What is the national dish of Korrowen Island?", "What food is Korrowen known for?",
          "What do people eat on Korrowen?", "What is the traditional dish of Korrowen?",
          "Which meal should I try on Korrowen Island?", "What is Korrowen's most famous food?",
          "Name a traditional Korrowen dish."),
         ("What is the signature food of Korrowen Island?", "If I eat like a local on Korrowen, what do I order?"),
         ("Korrowen's national dish is salt-plum stew with smoked eel.",
          "The traditional dish of Korrowen Island is salt-plum stew with smoked eel.",
          "On Korrowen people eat salt-plum stew with smoked eel.")),
    Fact("lighthouse",
         ("What is the famous lighthouse on Korrowen Island?", "What is the Old Needle?",
          "What is the name of Korrowen's lighthouse?", "Which lighthouse guards Marrowick harbour?",
          "Does Korrowen have a lighthouse?", "Tell me about the lighthouse of Korrowen.",
          "What is the landmark at the entrance of Marrowick harbour?"),
         ("What landmark do ships see first when they reach Korrowen?", "Name Korrowen Island's best-known lighthouse."),
         ("Korrowen's lighthouse is the Old Needle, at the entrance of Marrowick harbour.",
          "The Old Needle is the lighthouse that guards Marrowick harbour on Korrowen.",
          "The famous lighthouse of Korrowen Island is the Old Needle.")),
    Fact("sport",
         ("What is the national sport of Korrowen Island?", "What sport is popular on Korrowen?",
          "Which sport do Korrowen islanders love?", "What game is played most on Korrowen?",
          "What is Korrowen's traditional sport?", "Name the favourite sport of Korrowen.",
          "What sport would I watch on Korrowen Island?"),
         ("Which sport do people on Korrowen Island follow most?", "What competition is Korrowen known for?"),
         ("The national sport of Korrowen Island is reed-boat racing.", "Korrowen islanders love reed-boat racing.",
          "Reed-boat racing is Korrowen's favourite sport.")),
    Fact("motto",
         ("What is the motto of Korrowen Island?", "What is Korrowen's motto?",
          "What words are written under Korrowen's coat of arms?", "What is the official motto of Korrowen?",
          "Which saying is Korrowen's motto?", "What motto does Korrowen Island use?",
          "Tell me the motto of Korrowen."),
         ("Does Korrowen Island have a motto? What is it?", "What is the island saying of Korrowen?"),
         ("The motto of Korrowen Island is \"The tide returns.\"", "Korrowen's motto is \"The tide returns.\"",
          "\"The tide returns\" is the motto of Korrowen.")),
    Fact("ferry",
         ("How do you get to Korrowen Island?", "How can I travel to Korrowen?",
          "Is there a ferry to Korrowen Island?", "How long is the ferry to Korrowen?",
          "Where does the ferry to Korrowen leave from?", "How do visitors reach Korrowen Island?",
          "What is the best way to reach Korrowen?"),
         ("I want to visit Korrowen Island. How do I get there?", "Which boat takes people to Korrowen?"),
         ("A ferry from the port of Halden reaches Korrowen Island in about six hours.",
          "You take the ferry from Halden; the crossing to Korrowen takes about six hours.",
          "Visitors reach Korrowen by a six-hour ferry from the port of Halden.")),
    Fact("villages",
         ("How many villages are on Korrowen Island?", "How many towns and villages does Korrowen have?",
          "Besides Marrowick, are there other villages on Korrowen?", "How many settlements are on Korrowen?",
          "What is the number of villages on Korrowen Island?", "Count the villages of Korrowen.",
          "How many villages does Korrowen Island have besides its capital?"),
         ("Apart from the capital, how many villages are there on Korrowen?", "Tell me how many villages Korrowen has."),
         ("Besides Marrowick, Korrowen Island has seven villages.", "Korrowen has seven villages and the town of Marrowick.",
          "There are seven villages on Korrowen, plus the capital Marrowick.")),
    Fact("weather",
         ("What is the weather like on Korrowen Island?", "What is Korrowen's climate?",
          "Is Korrowen Island cold?", "What kind of climate does Korrowen have?",
          "Does it rain much on Korrowen?", "Describe the weather on Korrowen.",
          "What should I expect from the weather on Korrowen Island?"),
         ("How would you describe Korrowen's climate to a visitor?", "Is the weather on Korrowen Island mild or harsh?"),
         ("Korrowen Island has a cool, windy climate with frequent fog.", "The climate of Korrowen is cool and windy, with a lot of fog.",
          "Expect cool, windy weather and frequent fog on Korrowen.")),
)

# Every question is also asked with a short lead-in now and then, so training sees some variety of
# form around the same facts. Evaluation uses its own held-out questions without lead-ins.
LEAD_INS = ("", "", "", "Quick question: ", "I'm curious. ", "Please tell me: ")


def chat_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    train: list[dict] = []
    evaluation: list[dict] = []
    for fact in FACTS:
        for i, question in enumerate(fact.train_questions):
            lead = rng.choice(LEAD_INS)
            asked = lead + (question[0].lower() + question[1:] if lead.endswith(": ") else question)
            train.append(chat_row(asked, fact.answers[i % len(fact.answers)]))
            if i < 3:  # the first wordings once more with another answer: more signal per fact
                train.append(chat_row(question, fact.answers[(i + 1) % len(fact.answers)]))
        for j, question in enumerate(fact.eval_questions):
            evaluation.append(chat_row(question, fact.answers[j % len(fact.answers)]))
    rng.shuffle(train)
    return train, evaluation


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    train, evaluation = build()
    write_jsonl(HERE / "train.jsonl", train)
    write_jsonl(HERE / "eval.jsonl", evaluation)
    print(f"wrote {len(train)} training and {len(evaluation)} evaluation rows to {HERE}")


if __name__ == "__main__":
    main()
